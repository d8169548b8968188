"""The replica's decoding thread: it runs the requests `@serve.batch` gathers, merging the batches that wait for it.

Ray Serve's batcher (2.60) closes a batch when its wait ends, whether or not the previous batch is still decoding,
and with one batch at a time the next ones queue up already formed. With 16 concurrent clients on 2 cores,
`max_batch_size` 8, that made batches of 1 to 3 requests (113 batches: 36 of one, none over 6), and the deployment
ran at 1.3-1.6x a server that decodes one request at a time. Here Serve's batches only join a queue, and the one
decoding thread takes every waiting request for the same model (up to `max_batch_size`) whenever it is free.
`@serve.batch` still matters when the model is idle: its wait lets requests that arrive together start together.

Each request gets its own stream of `Delta`s, which ends with the request's last token (not with its batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from raylm.serving.generate import Delta, GenerationRequest

logger = logging.getLogger("ray.serve")
_END = object()


@dataclass(eq=False)
class Job:
    """One prompt to continue, with the model whose tokenizer encoded it (`loaded` is compared by identity: during
    a swap the old and the new model each decode their own jobs). `budget` holds its admission while it runs."""

    request: GenerationRequest
    loaded: Any
    budget: TokenBudget | None = None

    @property
    def cost(self) -> int:
        """What it may hold at most: its prompt and every token it may generate (a KV cache's rows)."""
        return len(self.request.prompt_ids) + self.request.max_new_tokens

    def end(self) -> None:
        """Give back its admission (once, from whichever side ends it first) and stop decoding it."""
        self.request.cancelled.set()
        if self.budget is not None:
            self.budget.give(self)


class TokenBudget:
    """The replica's admission rule in tokens: the jobs admitted and not yet ended hold at most `capacity` tokens of
    prompt plus `max_tokens` (a request counts its prompts x max_tokens, not 1), except that an idle replica takes
    any one request that fits the model. A request over the budget is refused at once (503), before it waits."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._lock = threading.Lock()

    def take(self, jobs: list[Job]) -> bool:
        cost = sum(job.cost for job in jobs)
        with self._lock:
            if self.used and self.used + cost > self.capacity:
                return False
            self.used += cost
            for job in jobs:
                job.budget = self
        return True

    def give(self, job: Job) -> None:
        with self._lock:
            if job.budget is self:
                self.used -= job.cost
                job.budget = None


class _Failed:
    def __init__(self, error: Exception):
        self.error = error


@dataclass
class _Waiting:
    job: Job
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: bool = False

    def send(self, item: Any) -> None:
        """From the decoding thread to the request's coroutine on the event loop."""
        if self.ended:
            return
        self.ended = item is _END or isinstance(item, _Failed)
        if self.ended:
            self.job.end()
        # A closed loop: the replica is shutting down and nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def deltas(self) -> AsyncIterator[Delta]:
        while (item := await self.queue.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item


class DecodeEngine:
    """`decode(jobs)` yields, after each decoding step, one entry per job: its `Delta`, or None once it finished.
    `on_batch(size)` hears of each batch as it starts (the replica's metric)."""

    def __init__(
        self,
        max_batch_size: int,
        decode: Callable[[list[Job]], Iterator[list[Delta | None]]],
        on_batch: Callable[[int], None] | None = None,
    ):
        self.max_batch_size = max_batch_size
        self._decode = decode
        self._on_batch = on_batch
        self._waiting: deque[_Waiting] = deque()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="raylm-decode", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False if the decoding thread died: the replica's health check fails and Serve replaces it."""
        return self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> list[AsyncIterator[Delta]]:
        """Queue the jobs; one stream of deltas per job. Call from the event loop the streams are read on."""
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(job, loop) for job in jobs]
        with self._wake:
            self._waiting.extend(waiting)
            self._wake.notify()
        return [w.deltas() for w in waiting]

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if self._on_batch:
                try:
                    self._on_batch(len(batch))
                except Exception:  # a metric must never stop the decoding thread
                    logger.exception("could not record the batch size")
            try:
                for step in self._decode([w.job for w in batch]):
                    for waiting, delta in zip(batch, step, strict=True):
                        if delta is not None and delta.error is not None:  # this row failed, the others go on
                            logger.error("decoding one request failed", exc_info=delta.error)
                            waiting.send(_Failed(delta.error))
                        elif delta is not None:
                            waiting.send(delta)
                            if delta.finish_reason is not None:
                                waiting.send(_END)
            except Exception as err:  # the model failed: every request left in this batch hears it; the next batch runs
                logger.exception("decoding failed")
                for waiting in batch:
                    waiting.send(_Failed(err))
            finally:
                for waiting in batch:  # rows cancelled mid-way end without a last delta
                    waiting.send(_END)

    def _next_batch(self) -> list[_Waiting]:
        """The oldest waiting job and those for the same model after it, up to max_batch_size. Jobs nobody waits
        for any more (timed out, disconnected before their turn) are dropped here, before they cost a step."""
        with self._wake:
            while True:
                for gone in [w for w in self._waiting if w.job.request.cancelled.is_set()]:
                    self._waiting.remove(gone)
                    gone.send(_END)
                if self._waiting:
                    break
                self._wake.wait()
            model = self._waiting[0].job.loaded
            batch = [w for w in self._waiting if w.job.loaded is model][: self.max_batch_size]
            for waiting in batch:
                self._waiting.remove(waiting)
        return batch
