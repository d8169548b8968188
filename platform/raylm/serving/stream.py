"""Server-sent events for streamed replies, and several async streams merged as they produce."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from raylm.serving.errors import error_type
from raylm.serving.schemas import error_body

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
_END = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) in the order items arrive; an error in any stream ends the merge with it."""
    if len(streams) == 1:  # the common case, without a queue
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, _END))
        except Exception as err:
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def sse(chunks: AsyncIterator[BaseModel], deadline: float | None = None) -> StreamingResponse:
    """`data: {json}` events ending with `data: [DONE]`. A failure after the first byte cannot change the status
    code: it is sent as an OpenAI error event instead, its details kept in the replica's log; so is the deadline
    (`time.monotonic()` seconds) passing, after which `chunks` is closed (its rows stop decoding)."""

    async def events() -> AsyncIterator[str]:
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), left)
                except StopAsyncIteration:
                    break
                yield f"data: {chunk.model_dump_json()}\n\n"
        except asyncio.TimeoutError:
            yield f"data: {json.dumps(_timed_out())}\n\n"
        except Exception:
            logger.exception("streamed generation failed")
            yield f"data: {json.dumps(_server_error())}\n\n"
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _server_error() -> dict[str, Any]:
    return error_body("internal error while generating the reply", error_type(500))


def _timed_out() -> dict[str, Any]:
    return error_body(
        "the reply was cut at the server's deadline (serve.request_timeout_s): ask for fewer tokens",
        error_type(408),
        code="timeout",
    )
