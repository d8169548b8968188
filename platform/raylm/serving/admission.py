"""What a replica checks before it spends work on a request: the body's size and shape, then the cheap bounds on
its length, the tokenizer after.

A prompt is refused for the context before it is tokenized when even the longest token the vocabulary has could not
pack it into the room left: a 1 MiB prompt costs a length check, not a tokenizer pass. Long texts are tokenized off
the replica's event loop, so they never stall the streams it is sending.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from raylm.serving.errors import ClientError, explain

T = TypeVar("T")
MAX_BODY_BYTES = 1 << 20
INLINE_CHARS = 4096
"""Texts up to this many characters are tokenized on the event loop: a thread hop costs more than they do."""
DEADLINE_MARGIN_S = 2.0
"""The replica answers 408 this much before Serve's proxy would (at most a tenth of the timeout): the proxy's own
408 is plain text, and its clock also counts the time a request waited for a replica."""


def parse(kind: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ClientError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        raise explain(err, body) from None


async def json_body(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refuse before reading it
        raise ClientError(413, f"request body of {declared} bytes is over the {MAX_BODY_BYTES}-byte limit")
    raw, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked upload declares no length
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ClientError(413, f"request body is over the {MAX_BODY_BYTES}-byte limit")
        raw.append(chunk)
    try:
        return json.loads(b"".join(raw))
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, an integer of 5000 digits, "[" nested 100k deep
        raise ClientError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None


def check_lengths(prompt: int, max_tokens: int, limit: int, context: int, prompt_param: str, tokens_param: str) -> None:
    """A prompt of `prompt` tokens asking for `max_tokens` more: within the server's limit and the model's context."""
    if not prompt:
        raise ClientError(400, f"the {prompt_param} encode to no tokens", prompt_param)
    if max_tokens > limit:
        raise ClientError(400, f"{tokens_param}={max_tokens} is over this server's limit of {limit}", tokens_param)
    if prompt + max_tokens > context:
        raise ClientError(
            400,
            f"the prompt ({prompt} tokens) plus {tokens_param} ({max_tokens}) is over the model's context of {context} "
            "tokens",
            tokens_param,
            "context_length_exceeded",
        )


def longest_token(tokenizer) -> int:
    """Characters in the vocabulary's longest entry: no token covers more characters of text. (A byte-level BPE
    writes each byte as one character, so an entry's length is the bytes it covers, never fewer than its characters.)
    """
    return max((len(entry) for entry in tokenizer.get_vocab()), default=1) or 1


def check_fits(text: str, loaded, reserved: int, what: str, param: str) -> None:
    """A 400 naming the numbers when `text` plus `reserved` tokens cannot fit in `loaded`'s context whatever the text
    tokenizes to (it takes at least one token per `loaded.longest_token` characters)."""
    least = -(-len(text) // loaded.longest_token)
    if least + reserved > loaded.context:
        raise ClientError(
            400,
            f"the {what} ({len(text)} characters, so at least {least} tokens) plus {param} ({reserved}) is over the "
            f"model's context of {loaded.context} tokens",
            param,
            "context_length_exceeded",
        )


async def off_the_loop(work: Callable[[], T], size: int) -> T:
    """`work()` in a thread when it handles more than INLINE_CHARS characters, else here."""
    if size <= INLINE_CHARS:
        return work()
    return await asyncio.to_thread(work)


def replica_deadline(configured: float | None, proxy: float | None) -> float | None:
    """Seconds a request may take here: the shorter of the app's and the proxy's timeouts, less a margin."""
    timeouts = [t for t in (configured, proxy) if t is not None and t > 0]
    if not timeouts:
        return None
    shortest = min(timeouts)
    return shortest - min(DEADLINE_MARGIN_S, shortest / 10)
