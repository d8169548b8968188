"""The Ray Serve deployment: a FastAPI ingress with OpenAI-compatible routes over one model, batched with
`@serve.batch`.

No client input produces a 5xx or a stack trace: the body is parsed here (not by FastAPI, whose 422 shape is not
OpenAI's), every validation problem becomes a 400 naming the parameter, and unexpected errors become a generic 500
whose details stay in the replica's log. The API key, when one is set, is checked against its SHA-256: the key
itself never enters the deployment's arguments, which Serve keeps in its config and shows on its dashboard.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations on the methods that
# Serve's ingress wraps, or it takes `request` for a query parameter.
import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.serving.generate import GenerationRequest, GenerationResult, generate_batch
from raylm.serving.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)

logger = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 1 << 20


class ClientError(Exception):
    """A request the client must fix: becomes an OpenAI error object with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, _error_type(status), param, code), status_code=status)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ClientError)
    async def _client_error(request: Request, err: ClientError) -> JSONResponse:
        return _error_response(err.status, err.message, err.param, err.code)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(err.status_code, str(err.detail))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return _error_response(400, f"invalid request: {first['msg']}", param)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return _error_response(500, "internal error while serving the request")


def _explain(err: ValidationError) -> "ClientError":
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return ClientError(400, f"unknown parameter {param!r}", param, "unknown_parameter")
    if first["type"] == "missing":
        return ClientError(400, f"missing required parameter {param!r}", param, "missing_parameter")
    return ClientError(400, f"invalid {param!r}: {first['msg']}", param, "invalid_value")


api = FastAPI(title="raylm", docs_url=None, redoc_url=None)
install_error_handlers(api)


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class LMServer:
    def __init__(
        self,
        model_dir: str,
        served_name: str,
        aliases: list[str],
        threads: int = 1,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        max_tokens_limit: int = 512,
        api_key_sha256: str | None = None,
    ):
        import torch
        from transformers import AutoTokenizer

        from raylm.models import context_length, load_pretrained

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_pretrained(model_dir).eval()
        self.context = context_length(self.model)
        self.served_name = served_name
        self.names = {served_name, *aliases}
        self.created = int(time.time())
        self.max_tokens_limit = max_tokens_limit
        self.api_key_sha256 = api_key_sha256
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _authorize(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self.api_key_sha256):
            raise ClientError(
                401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.served_name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return ModelList(data=[ModelCard(id=name, created=self.created) for name in sorted(self.names)]).model_dump()

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        body = await self._json_body(request)
        try:
            params = CompletionRequest.model_validate(body)
        except ValidationError as err:
            raise _explain(err) from None
        if params.model is not None and params.model not in self.names:
            raise ClientError(
                404, f"model {params.model!r} is not served here; try {sorted(self.names)}", "model", "model_not_found"
            )
        prompt_ids = self.tokenizer(params.prompt, add_special_tokens=False)["input_ids"]
        self._check_lengths(len(prompt_ids), params.max_tokens)
        result: GenerationResult = await self.generate(
            GenerationRequest(
                prompt_ids=prompt_ids,
                max_new_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=params.stop_strings,
            )
        )
        completion = len(result.token_ids)
        return CompletionResponse(
            model=params.model or self.served_name,
            choices=[CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason)],
            usage=Usage(
                prompt_tokens=len(prompt_ids), completion_tokens=completion, total_tokens=len(prompt_ids) + completion
            ),
        ).model_dump()

    async def _json_body(self, request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ClientError(413, f"request body of {len(raw)} bytes is over the {MAX_BODY_BYTES}-byte limit")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ClientError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None

    def _check_lengths(self, prompt_tokens: int, max_tokens: int) -> None:
        if max_tokens > self.max_tokens_limit:
            raise ClientError(
                400, f"max_tokens={max_tokens} is over this server's limit of {self.max_tokens_limit}", "max_tokens"
            )
        if prompt_tokens + max_tokens > self.context:
            raise ClientError(
                400,
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over the model's context of "
                f"{self.context} tokens",
                "max_tokens",
                "context_length_exceeded",
            )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        # Generation is compute-bound: run it off the event loop so health checks and new requests keep flowing.
        return await asyncio.to_thread(generate_batch, self.model, self.tokenizer, requests)


def build_app(model_dir: str, served_name: str, aliases: list[str], options: dict[str, Any], num_replicas: int = 1):
    """The Serve application for one model (`options`: threads, batching and limits, the API key's hash)."""
    # Serve's default of 5 ongoing requests per replica would cap every batch at 5.
    ongoing = 2 * options.get("max_batch_size", 8)
    return LMServer.options(num_replicas=num_replicas, max_ongoing_requests=ongoing).bind(
        model_dir, served_name, aliases, **options
    )
