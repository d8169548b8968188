"""The Ray Serve deployment: a FastAPI ingress with OpenAI-compatible routes over one model, batched with
`@serve.batch`.

Every request, streamed or not, goes through `LMServer.admit`: `@serve.batch` gathers the requests that arrive
within `batch_wait_timeout_s` (up to `max_batch_size`) and hands them to the replica's decoding thread
(`serving.engine`), which decodes all waiting requests together, one step at a time, and hands each caller its own
row's text as it grows. A streamed reply is that growth sent as server-sent events; a plain one is its sum.

Before any of that a request passes the replica's own checks, cheapest first: the API key (`serving.access`), the
body's size and shape, the context (a length bound before the tokenizer runs, the exact count after), and the token
budget (`serving.engine.TokenBudget`: 503 with Retry-After). A reply not ready before the replica's deadline (a
little under Serve's `request_timeout_s`) is a 408 from here, as an OpenAI error object; a stream past it ends with
an error event. Either way its rows stop decoding.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations on the methods that
# Serve's ingress wraps, or it takes `request` for a query parameter.
import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from raylm.serving.access import authorized, replica_key_hash, runtime_env_vars, serve_http_options
from raylm.serving.admission import check_fits, check_lengths, json_body, off_the_loop, parse, replica_deadline
from raylm.serving.chat import render_chat
from raylm.serving.engine import DecodeEngine, Job, TokenBudget
from raylm.serving.errors import ClientError, install_error_handlers
from raylm.serving.generate import Delta, GenerationRequest, generate_steps
from raylm.serving.replies import Reply, Response, usage_of
from raylm.serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
)
from raylm.serving.source import LoadedModel, ModelSource, load_model, resolve_source
from raylm.serving.stream import merge, sse

logger = logging.getLogger("ray.serve")


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


async def _summed(deltas: AsyncIterator[Delta]) -> Reply:
    reply = Reply()
    async for delta in deltas:
        reply.add(delta)
    return reply


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
        api_key_file: str | None = None,
        quantize: str | None = None,
        reload_interval_s: float = 5.0,
        request_timeout_s: float | None = None,
        token_budget: int | None = None,
        retry_after_s: float = 1.0,
        max_ongoing_requests: int = 16,
    ):
        http = serve_http_options()
        # First, before a model is loaded: a replica that would serve beyond loopback without a key never starts.
        self.api_key_sha256 = replica_key_hash(api_key_sha256, api_key_file, http.host, runtime_env_vars())
        self.deadline_s = replica_deadline(request_timeout_s, http.request_timeout_s)
        self.source = ModelSource(**source)
        self.threads, self.quantize = threads, quantize
        self.loaded = load_model(resolve_source(self.source), threads, quantize)
        self.created = int(time.time())
        self.max_tokens_limit = max_tokens_limit
        self.budget = TokenBudget(token_budget or max_ongoing_requests * self.loaded.context)
        self.retry_after_s = retry_after_s
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

    def _model_for(self, requested: str | None, route: str) -> LoadedModel:
        loaded = self.loaded  # one snapshot per request: a swap mid-request does not mix tokenizers
        if requested is not None and requested not in loaded.names:
            raise ClientError(
                404, f"model {requested!r} is not served here; try {sorted(loaded.names)}", "model", "model_not_found"
            )
        if route not in loaded.task.routes:
            name = loaded.resolved.name
            raise ClientError(400, f"{name} is a {loaded.task.name} model: it does not serve {route}", "model", "task")
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
        started = time.monotonic()
        self._authorize(request)
        params = parse(CompletionRequest, await json_body(request))
        loaded = self._model_for(params.model, "completions")
        texts = params.prompts
        for index, text in enumerate(texts):
            what = "prompt" if isinstance(params.prompt, str) else f"prompt {index}"
            check_fits(text, loaded, params.max_tokens, what, "max_tokens")
        size = sum(len(text) for text in texts)
        prompts = await off_the_loop(lambda: loaded.tokenizer(texts, add_special_tokens=False)["input_ids"], size)
        jobs = [self._job(loaded, ids, params.max_tokens, params, params.stop_strings, "prompt") for ids in prompts]
        response = self._response(params, loaded, "cmpl", sum(len(ids) for ids in prompts))
        if params.stream:
            return sse(response.completion_chunks(await self._stream(jobs)), self._deadline_at(started))
        replies = await self._replies(jobs, started)
        return CompletionResponse(
            **response.identity(),
            choices=[
                CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(replies)
            ],
            usage=usage_of(response.prompt_tokens, replies),
        ).model_dump()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        started = time.monotonic()
        self._authorize(request)
        params = parse(ChatCompletionRequest, await json_body(request))
        loaded = self._model_for(params.model, "chat")
        messages = [(m.role, m.text) for m in params.messages]
        size = sum(len(text) for _, text in messages)
        text, template_stops = await off_the_loop(lambda: render_chat(loaded.tokenizer, messages), size)
        param = "max_completion_tokens" if params.max_completion_tokens else "max_tokens"
        check_fits(text, loaded, params.reply_tokens or 1, "conversation as the chat template renders it", param)
        ids = await off_the_loop(lambda: loaded.tokenizer(text, add_special_tokens=False)["input_ids"], len(text))
        max_tokens = params.reply_tokens or max(1, min(self.max_tokens_limit, loaded.context - len(ids)))
        job = self._job(loaded, ids, max_tokens, params, params.stop_strings + template_stops, "messages", param)
        response = self._response(params, loaded, "chatcmpl", len(ids))
        if params.stream:
            return sse(response.chat_chunks(await self._stream([job])), self._deadline_at(started))
        (answer,) = await self._replies([job], started)
        return ChatCompletionResponse(
            **response.identity(),
            choices=[
                ChatChoice(index=0, message=AssistantMessage(content=answer.text), finish_reason=answer.finish_reason)
            ],
            usage=usage_of(response.prompt_tokens, [answer]),
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
        check_lengths(len(prompt_ids), max_tokens, self.max_tokens_limit, loaded.context, prompt_param, tokens_param)
        request = GenerationRequest(prompt_ids, max_tokens, params.temperature, params.top_p, params.seed, stop)
        return Job(request, loaded)

    @staticmethod
    def _response(params: SamplingFields, loaded: LoadedModel, prefix: str, prompt_tokens: int) -> Response:
        return Response(params, loaded.resolved.name, loaded.resolved.fingerprint, prefix, prompt_tokens)

    def _deadline_at(self, started: float) -> float | None:
        return None if self.deadline_s is None else started + self.deadline_s

    async def _admitted(self, jobs: list[Job]) -> list[AsyncIterator[Delta]]:
        """The jobs' delta streams, once the token budget took them and the engine has them (each job gives its
        share back when it ends, there or here)."""
        if not self.budget.take(jobs):
            tokens = sum(job.cost for job in jobs)
            raise ClientError(
                503,
                f"this replica is at its token budget: {self.budget.used} of {self.budget.capacity} tokens (prompts "
                f"plus max_tokens) are being decoded, and this request needs {tokens}; retry shortly",
                code="overloaded",
                headers={"Retry-After": f"{self.retry_after_s:g}"},
            )
        try:
            return await asyncio.gather(*(self.admit(job) for job in jobs))
        except BaseException:
            for job in jobs:
                job.end()
            raise

    async def _replies(self, jobs: list[Job], started: float) -> list[Reply]:
        async def decoded() -> list[Reply]:
            return await asyncio.gather(*(_summed(deltas) for deltas in await self._admitted(jobs)))

        deadline = self._deadline_at(started)
        try:
            return await asyncio.wait_for(decoded(), None if deadline is None else deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise ClientError(
                408,
                f"the reply was not ready within {self.deadline_s:.3g}s (serve.request_timeout_s): ask for fewer "
                "tokens, or retry when the server is less busy",
                code="timeout",
            ) from None
        finally:  # timed out or disconnected: stop spending steps on it
            for job in jobs:
                job.end()

    async def _stream(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Delta]]:
        """Admitted before the response starts (a refusal is still a status code); streamed as the rows decode."""
        streams = await self._admitted(jobs)

        async def merged() -> AsyncIterator[tuple[int, Delta]]:
            try:
                async for item in merge(streams):
                    yield item
            finally:
                for job in jobs:
                    job.end()

        return merged()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def admit(self, jobs: list[Job]) -> list[AsyncIterator[Delta]]:
        # Returns at once: the batch's semaphore is free for the next one while these decode (see serving.engine).
        return self.engine.submit(jobs)

    # -- authentication ------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization", ""), self.api_key_sha256):
            raise ClientError(
                401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )


def build_app(source: ModelSource, options: dict[str, Any], deployment: dict[str, Any]):
    """The Serve application for one model. `options`: the replica's (threads, batching, limits, the API key's hash,
    quantization); `deployment`: Serve's (replicas or autoscaling, queue limits, health checks, shutdown)."""
    return LMServer.options(**deployment).bind(
        {"path": source.path, "registry": source.registry, "ref": source.ref}, **options
    )
