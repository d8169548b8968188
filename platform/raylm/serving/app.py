"""The Ray Serve deployment: a FastAPI ingress with OpenAI-compatible routes over one model, batched with
`@serve.batch`.

Every request, streamed or not, goes through `LMServer.admit`: `@serve.batch` gathers the requests that arrive
within `batch_wait_timeout_s` (up to `max_batch_size`) and hands them to the replica's decoding thread
(`serving.engine`), which decodes all waiting requests together, one step at a time, and hands each caller its own
row's text as it grows. A streamed reply is that growth sent as server-sent events; a plain one is its sum. The API
key, when one is set, is checked against its SHA-256: the key itself never enters the deployment's arguments, which
Serve keeps in its config and shows on its dashboard.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations on the methods that
# Serve's ingress wraps, or it takes `request` for a query parameter.
import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from ray import serve

from raylm.serving.chat import render_chat
from raylm.serving.engine import DecodeEngine, Job
from raylm.serving.errors import ClientError, explain, install_error_handlers
from raylm.serving.generate import Delta, GenerationRequest, generate_steps
from raylm.serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from raylm.serving.source import LoadedModel, ModelSource, load_model, resolve_source
from raylm.serving.stream import merge, sse

logger = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 1 << 20


@dataclass
class Reply:
    text: str = ""
    tokens: int = 0
    finish_reason: str = "length"

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens = max(self.tokens, delta.tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason


def decode(jobs: list[Job]) -> Iterator[list[Delta | None]]:
    """The engine hands over jobs for one model at a time."""
    loaded = jobs[0].loaded
    return generate_steps(loaded.model, loaded.tokenizer, [job.request for job in jobs])


def decode_batch_histogram():
    """Requests per batch the model decoded, on Ray's metrics endpoint as `ray_raylm_decode_batch_size` (Serve's own
    `ray_serve_actual_batch_size` counts the batches its batcher hands over, which the decoding thread merges)."""
    from ray.util.metrics import Histogram

    return Histogram(
        "raylm_decode_batch_size",
        description="Requests per batch the model decoded.",
        boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
    )


class _Replying:
    """One response's identity (id, created, model, fingerprint) and its streamed chunks."""

    def __init__(self, params: SamplingFields, loaded: LoadedModel, prefix: str, prompt_tokens: int):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = params.model or loaded.resolved.name
        self.fingerprint = loaded.resolved.fingerprint
        self.include_usage = bool(params.stream_options and params.stream_options.include_usage)
        self.prompt_tokens = prompt_tokens

    def _identity(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint}

    async def completion_chunks(self, deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[BaseModel]:
        tokens: dict[int, int] = {}
        async for index, delta in deltas:
            tokens[index] = delta.tokens
            if delta.text or delta.finish_reason:
                choice = CompletionChoice(index=index, text=delta.text, finish_reason=delta.finish_reason)
                yield CompletionResponse(**self._identity(), choices=[choice])
        if self.include_usage:
            yield CompletionResponse(**self._identity(), choices=[], usage=self.usage(sum(tokens.values())))

    async def chat_chunks(self, deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[BaseModel]:
        yield ChatCompletionChunk(
            **self._identity(), choices=[ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))]
        )
        tokens = 0
        async for _, delta in deltas:
            tokens = delta.tokens
            if delta.text or delta.finish_reason:
                choice = ChatChunkChoice(
                    index=0, delta=ChatDelta(content=delta.text or None), finish_reason=delta.finish_reason
                )
                yield ChatCompletionChunk(**self._identity(), choices=[choice])
        if self.include_usage:
            yield ChatCompletionChunk(**self._identity(), choices=[], usage=self.usage(tokens))

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )


def _usage(jobs: list[Job], replies: list[Reply]) -> Usage:
    prompt = sum(len(job.request.prompt_ids) for job in jobs)
    completion = sum(reply.tokens for reply in replies)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _parse(kind: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ClientError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        raise explain(err, body) from None


async def _json_body(request: Request) -> Any:
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


# Everything the routes call is defined above the class: `@serve.ingress` pickles the FastAPI app when the class is
# defined, and a module-level name defined later would be missing from the copy the replica runs.


api = FastAPI(title="raylm", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class LMServer:
    def __init__(
        self,
        source: dict[str, str | None],
        threads: int = 1,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        max_tokens_limit: int = 512,
        api_key_sha256: str | None = None,
        quantize: str | None = None,
        reload_interval_s: float = 5.0,
    ):
        self.source = ModelSource(**source)
        self.threads, self.quantize = threads, quantize
        self.loaded = load_model(resolve_source(self.source), threads, quantize)
        self.created = int(time.time())
        self.max_tokens_limit = max_tokens_limit
        self.api_key_sha256 = api_key_sha256
        self.engine = DecodeEngine(max_batch_size, decode, decode_batch_histogram().observe)
        self.admit.set_max_batch_size(max_batch_size)
        self.admit.set_batch_wait_timeout_s(batch_wait_timeout_s)
        if self.source.follows_alias and reload_interval_s > 0:
            threading.Thread(target=self._follow, args=(reload_interval_s,), name="raylm-follow", daemon=True).start()

    # -- the model -----------------------------------------------------------------------------------------------

    def _follow(self, interval_s: float) -> None:
        """Poll the alias this replica serves; load a newly promoted version beside the old one, then swap. On the
        same version, keep the names it answers to current (`lm:best` moved onto or off the version served)."""
        while True:
            time.sleep(interval_s)
            try:
                resolved, loaded = resolve_source(self.source), self.loaded
                if resolved.version == loaded.resolved.version:
                    if resolved.names != loaded.names:
                        self.loaded = replace(loaded, resolved=resolved, names=resolved.names)
                    continue
                self.loaded = load_model(resolved, self.threads, self.quantize)
                logger.info("now serving %s version %s (%s)", resolved.name, resolved.version, self.source.ref)
            except Exception:  # keep serving the model we have; the next poll tries again
                logger.exception("could not load the new version of %s", self.source.ref)

    def check_health(self) -> None:
        """Serve's health check: the replica must still hold a model and decode."""
        if self.loaded is None or self.loaded.model is None:
            raise RuntimeError("no model loaded")
        if not self.engine.alive:
            raise RuntimeError("the decoding thread died")

    def _model_for(self, requested: str | None) -> LoadedModel:
        loaded = self.loaded  # one snapshot per request: a swap mid-request does not mix tokenizers
        if requested is not None and requested not in loaded.names:
            raise ClientError(
                404, f"model {requested!r} is not served here; try {sorted(loaded.names)}", "model", "model_not_found"
            )
        return loaded

    # -- routes --------------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.loaded.resolved.name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        names = sorted(self.loaded.names)
        return ModelList(data=[ModelCard(id=name, created=self.created) for name in names]).model_dump()

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._authorize(request)
        params = _parse(CompletionRequest, await _json_body(request))
        loaded = self._model_for(params.model)
        prompts = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in params.prompts]
        jobs = [self._job(loaded, ids, params.max_tokens, params, params.stop_strings, "prompt") for ids in prompts]
        reply = _Replying(params, loaded, "cmpl", sum(len(ids) for ids in prompts))
        if params.stream:
            return sse(reply.completion_chunks(self._stream(jobs)))
        replies = await asyncio.gather(*(self._collect(job) for job in jobs))
        return CompletionResponse(
            id=reply.id,
            model=reply.model,
            system_fingerprint=reply.fingerprint,
            choices=[
                CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(replies)
            ],
            usage=_usage(jobs, replies),
        ).model_dump()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self._authorize(request)
        params = _parse(ChatCompletionRequest, await _json_body(request))
        loaded = self._model_for(params.model)
        text, template_stops = render_chat(loaded.tokenizer, [(m.role, m.text) for m in params.messages])
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        param = "max_completion_tokens" if params.max_completion_tokens else "max_tokens"
        max_tokens = params.reply_tokens or max(1, min(self.max_tokens_limit, loaded.context - len(ids)))
        job = self._job(loaded, ids, max_tokens, params, params.stop_strings + template_stops, "messages", param)
        reply = _Replying(params, loaded, "chatcmpl", len(ids))
        if params.stream:
            return sse(reply.chat_chunks(self._stream([job])))
        (answer,) = await asyncio.gather(self._collect(job))
        return ChatCompletionResponse(
            id=reply.id,
            model=reply.model,
            system_fingerprint=reply.fingerprint,
            choices=[
                ChatChoice(index=0, message=AssistantMessage(content=answer.text), finish_reason=answer.finish_reason)
            ],
            usage=_usage([job], [answer]),
        ).model_dump()

    # -- generation ----------------------------------------------------------------------------------------------

    def _job(
        self,
        loaded: LoadedModel,
        prompt_ids: list[int],
        max_tokens: int,
        params: SamplingFields,
        stop: list[str],
        prompt_param: str,
        tokens_param: str = "max_tokens",
    ) -> Job:
        if not prompt_ids:
            raise ClientError(400, f"the {prompt_param} encode to no tokens", prompt_param)
        if max_tokens > self.max_tokens_limit:
            raise ClientError(
                400, f"{tokens_param}={max_tokens} is over this server's limit of {self.max_tokens_limit}", tokens_param
            )
        if len(prompt_ids) + max_tokens > loaded.context:
            raise ClientError(
                400,
                f"the prompt ({len(prompt_ids)} tokens) plus {tokens_param} ({max_tokens}) is over the model's context "
                f"of {loaded.context} tokens",
                tokens_param,
                "context_length_exceeded",
            )
        request = GenerationRequest(prompt_ids, max_tokens, params.temperature, params.top_p, params.seed, stop)
        return Job(request, loaded)

    async def _collect(self, job: Job) -> Reply:
        reply = Reply()
        try:
            async for delta in await self.admit(job):
                reply.add(delta)
        finally:  # timed out or disconnected: stop spending steps on it
            job.request.cancelled.set()
        return reply

    async def _stream(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Delta]]:
        try:
            streams = await asyncio.gather(*(self.admit(job) for job in jobs))
            async for item in merge(streams):
                yield item
        finally:
            for job in jobs:
                job.request.cancelled.set()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def admit(self, jobs: list[Job]) -> list[AsyncIterator[Delta]]:
        # Returns at once: the batch's semaphore is free for the next one while these decode (see serving.engine).
        return self.engine.submit(jobs)

    # -- authentication ------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self.api_key_sha256):
            raise ClientError(
                401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )


def build_app(source: ModelSource, options: dict[str, Any], deployment: dict[str, Any]):
    """The Serve application for one model. `options`: the replica's (threads, batching, limits, the API key's hash,
    quantization); `deployment`: Serve's (replicas or autoscaling, queue limits, health checks, shutdown)."""
    return LMServer.options(**deployment).bind(
        {"path": source.path, "registry": source.registry, "ref": source.ref}, **options
    )
