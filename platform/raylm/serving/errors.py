"""Client errors as OpenAI error objects: `{"error": {"message", "type", "param", "code"}}`.

No client input produces a 5xx or a stack trace: the body is parsed by the routes (not by FastAPI, whose 422 shape
is not OpenAI's), every validation problem becomes a 400 naming the parameter, and unexpected errors become a
generic 500 whose details stay in the replica's log.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.serving.schemas import error_body

logger = logging.getLogger("ray.serve")


class ClientError(Exception):
    """A request the client must fix: becomes an OpenAI error object with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 408: "timeout_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type(status), param, code), status_code=status, headers=headers)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ClientError)
    async def _client_error(request: Request, err: ClientError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return error_response(400, f"invalid request: {first['msg']}", param)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return error_response(500, "internal error while serving the request")


def explain(err: ValidationError, body: Any) -> ClientError:
    """The problem pydantic found in `body`, as a 400 naming the parameter (`messages.0.role`, `prompt.1`, ...)."""
    # Of a union's errors the deepest is the one about what was sent (a list's bad item, not "is not a string").
    located = [(problem, _place_in_body(problem, body)) for problem in err.errors()]
    first, place = max(located, key=lambda pair: len(pair[1]))
    param = ".".join(place) or None
    if first["type"] == "extra_forbidden":
        return ClientError(400, f"unknown parameter {param!r}", param, "unknown_parameter")
    if first["type"] == "missing":
        return ClientError(400, f"missing required parameter {param!r}", param, "missing_parameter")
    return ClientError(400, f"invalid {param!r}: {first['msg']}", param, "invalid_value")


def _place_in_body(problem: dict, body: Any) -> list[str]:
    """The error's location as a path into what the client sent. Pydantic's location also names the union member
    it tried (`prompt.str`, `prompt.list[...].1`): those labels are no key of the body, so walking the body along
    the location drops them, whatever pydantic calls them."""
    loc, place, value = problem["loc"], [], body
    for depth, part in enumerate(loc):
        is_last = depth == len(loc) - 1
        if isinstance(part, int) and isinstance(value, list) and 0 <= part < len(value):
            place.append(str(part))
            value = value[part]
        elif (
            isinstance(part, str)
            and isinstance(value, dict)
            and (part in value or (is_last and problem["type"] == "missing"))
        ):
            place.append(part)
            value = value.get(part)
    return place
