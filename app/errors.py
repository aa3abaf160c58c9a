"""One error shape everywhere: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's).

Routes raise ``ApiError``; validation errors, unknown paths and unexpected failures are
turned into the same shape by the handlers installed here, and the pure-ASGI middleware
(401, 413) writes it with ``error_bytes``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("app")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "overloaded_error",
    499: "client_closed_request",
    500: "server_error",
    503: "unavailable_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


def not_ready(message: str = "the server is shutting down") -> ApiError:
    return ApiError(503, message, code="not_ready", headers={"Retry-After": "5"})


def error_responses(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: each status with the one error shape and what it means there."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in descriptions.items()}


def error_payload(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_bytes(status: int, message: str, *, code: str, param: str | None = None) -> bytes:
    return json.dumps(error_payload(message, TYPES.get(status, "invalid_request_error"), param, code)).encode()


def _param(loc: Sequence[Any]) -> str | None:
    """('body', 'n') -> 'n'; ('query', 'class') -> 'class'; ('body',) -> None."""
    names = [str(part) for part in loc[1:] if isinstance(part, str)]
    return ".".join(names) or None


def validation_message(errors: Sequence[Mapping[str, Any]], allowed: Mapping[str, str]) -> tuple[str, str | None, str]:
    """(message, param, code) for pydantic errors; each names its field and what it accepts."""
    parts: list[str] = []
    first_param: str | None = None
    first_code = "invalid_value"
    for i, err in enumerate(errors):
        kind = str(err.get("type", "invalid_value"))
        loc = err.get("loc", ())
        param = _param(loc)
        if kind == "json_invalid":
            text = f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        elif kind == "missing" and param is None:
            text = 'a JSON body is required, e.g. {"class": 3, "n": 16}'
        elif kind == "missing":
            text = f"{param}: required; allowed: {allowed.get(param or '', 'see the API docs')}"
        elif kind == "extra_forbidden":
            fields = ", ".join(allowed) if allowed else "see the API docs"
            text = f"{param}: unknown field; known fields: {fields}"
        elif kind in ("model_attributes_type", "dict_type") and param is None:
            text = f'the request body must be a JSON object, e.g. {{"class": 3, "n": 16}}; got {err.get("input")!r}'
        else:
            msg = str(err.get("msg", "invalid value"))
            msg = msg[0].lower() + msg[1:] if msg else msg
            text = f"{param}: {msg}"
            if param is not None and param in allowed and kind != "class_value":
                text += f"; allowed: {allowed[param]}"
            if "input" in err and kind != "class_value":
                text += f"; got {err['input']!r}"
        parts.append(text)
        if i == 0:
            first_param, first_code = param, kind
    return "; ".join(parts), first_param, first_code


def install_handlers(
    app: FastAPI, allowed: Mapping[str, str], by_path: Mapping[str, Mapping[str, str]] | None = None
) -> None:
    """Route every error through the one shape. ``allowed`` says what each field accepts; ``by_path``
    replaces it for the routes whose bodies have other fields (``POST /jobs``)."""
    by_path = dict(by_path or {})

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(exc.errors(), by_path.get(request.url.path, allowed))
        return JSONResponse(error_payload(message, TYPES[422], param, code), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message, code = f"no route {request.method} {request.url.path}", "not_found"
        elif status == 405:
            message, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), f"http_{status}"
        payload = error_payload(message, TYPES.get(status, "invalid_request_error"), None, code)
        return JSONResponse(payload, status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        payload = error_payload(f"internal error: {type(exc).__name__}", TYPES[500], None, "internal_error")
        return JSONResponse(payload, status_code=500)
