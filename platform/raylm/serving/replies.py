"""A response's shape: the plain reply summed from a request's deltas, and the chunks of a streamed one."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from raylm.serving.generate import Delta
from raylm.serving.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    SamplingFields,
    Usage,
)


@dataclass
class Reply:
    """One prompt's reply, summed from its deltas."""

    text: str = ""
    tokens: int = 0
    finish_reason: str = "length"

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens = max(self.tokens, delta.tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason


def usage_of(prompt_tokens: int, replies: list[Reply]) -> Usage:
    completion = sum(reply.tokens for reply in replies)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


class Response:
    """One response's identity (id, created, model, fingerprint), and its chunks when streamed."""

    def __init__(self, params: SamplingFields, name: str, fingerprint: str, prefix: str, prompt_tokens: int):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = params.model or name
        self.fingerprint = fingerprint
        self.include_usage = bool(params.stream_options and params.stream_options.include_usage)
        self.prompt_tokens = prompt_tokens

    def identity(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint}

    async def completion_chunks(self, deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[BaseModel]:
        tokens: dict[int, int] = {}
        async for index, delta in deltas:
            tokens[index] = delta.tokens
            if delta.text or delta.finish_reason:
                choice = CompletionChoice(index=index, text=delta.text, finish_reason=delta.finish_reason)
                yield CompletionResponse(**self.identity(), choices=[choice])
        if self.include_usage:
            yield CompletionResponse(**self.identity(), choices=[], usage=self.usage(sum(tokens.values())))

    async def chat_chunks(self, deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[BaseModel]:
        yield ChatCompletionChunk(
            **self.identity(), choices=[ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))]
        )
        tokens = 0
        async for _, delta in deltas:
            tokens = delta.tokens
            if delta.text or delta.finish_reason:
                choice = ChatChunkChoice(
                    index=0, delta=ChatDelta(content=delta.text or None), finish_reason=delta.finish_reason
                )
                yield ChatCompletionChunk(**self.identity(), choices=[choice])
        if self.include_usage:
            yield ChatCompletionChunk(**self.identity(), choices=[], usage=self.usage(tokens))

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )
