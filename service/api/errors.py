"""Every error leaves the service as one JSON shape per protocol family, chosen by path prefix:

* native API: ``{"error": {"type", "message", "field"}}``;
* ``/openai/...``: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``type``
  ``invalid_request_error`` for client errors, ``server_error`` otherwise; ``code`` is the native
  type; validation problems are 400 as OpenAI answers them, not 422);
* ``/v2/...`` (KServe v2 / Open Inference Protocol): ``{"error": "<message>"}``, 400 for bad input.

The service's own errors (:class:`~service.engine.errors.ServiceError`: engine, session and body
errors) carry their type, message, field, status and ``retry_after``; :func:`describe_error`
reads them (anything else is a 500 ``internal_error``) and :data:`SHAPES` renders the result for
each family: that is the whole mapping, for HTTP responses, WebSocket error messages and errors
sent inside a stream that has already started. FastAPI's validation errors and Starlette's HTTP
errors are reshaped through the same table. Client-caused problems are 4xx; 5xx is reserved for
the service's own state (no model, queue full, deadline) and real bugs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.errors import ServiceError

log = logging.getLogger("service.errors")

NATIVE = "native"
OPENAI = "openai"
KSERVE = "kserve"
OPENAI_PREFIX = "/openai"
KSERVE_PREFIX = "/v2"


def api_style(path: str) -> str:
    """Which protocol family a path belongs to (decides the error body shape)."""
    if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
        return OPENAI
    if path == KSERVE_PREFIX or path.startswith(KSERVE_PREFIX + "/"):
        return KSERVE
    return NATIVE


@dataclass(frozen=True)
class ErrorInfo:
    """One error, independent of the shape it will be sent in."""

    status: int
    type: str
    message: str
    field: str | None = None
    headers: dict[str, str] | None = None
    details: list[dict[str, Any]] | None = None


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))}


def describe_error(exc: BaseException) -> ErrorInfo:
    """What a client is told about ``exc``."""
    if isinstance(exc, ServiceError):
        headers = None if exc.retry_after is None else _retry_after(exc.retry_after)
        return ErrorInfo(exc.status, exc.type, exc.message, exc.field, headers)
    return ErrorInfo(500, "internal_error", "internal server error")


def native_error_body(e: ErrorInfo) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"type": e.type, "message": e.message, "field": e.field}
    if e.details:
        body["details"] = e.details
    return e.status, {"error": body}


def openai_error_body(status: int, type_: str, message: str, field: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (also sent as a ``data:`` event when a stream fails midway)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": field, "code": type_}}


def _openai_shape(e: ErrorInfo) -> tuple[int, dict[str, Any]]:
    status = 400 if e.status == 422 else e.status
    return status, openai_error_body(status, e.type, e.message, e.field)


def _kserve_shape(e: ErrorInfo) -> tuple[int, dict[str, Any]]:
    return (400 if e.status == 422 else e.status), {"error": e.message}


# The one mapping from an error to what each protocol family answers: (status, JSON body).
SHAPES: dict[str, Callable[[ErrorInfo], tuple[int, dict[str, Any]]]] = {
    NATIVE: native_error_body,
    OPENAI: _openai_shape,
    KSERVE: _kserve_shape,
}


def render_error(style: str, e: ErrorInfo) -> JSONResponse:
    status, body = SHAPES[style](e)
    return JSONResponse(body, status_code=status, headers=e.headers)


def error_response(
    status: int,
    type_: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    """A native-shape error response."""
    return render_error(NATIVE, ErrorInfo(status, type_, message, field, headers, details))


def shaped_error(
    request: Request,
    status: int,
    type_: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    """The error response in the shape of the protocol the request's path belongs to."""
    return render_error(api_style(request.url.path), ErrorInfo(status, type_, message, field, headers, details))


@dataclass
class ErrorBody:
    """An error as a WebSocket message carries it: the HTTP status, body and Retry-After."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def error_body(exc: BaseException, path: str = "websocket") -> ErrorBody:
    """The status and native ``{"error": {...}}`` body the HTTP API would answer for ``exc``
    (a service error, a pydantic validation error of a message, or a bug)."""
    if isinstance(exc, ValidationError):
        info = validation_info(exc.errors(), NATIVE, in_request=False)
    else:
        info = describe_error(exc)
        _log_server_error(path, exc, info)
    status, body = native_error_body(info)
    return ErrorBody(status, body, dict(info.headers or {}))


def _log_server_error(path: str, exc: BaseException, info: ErrorInfo) -> None:
    if not isinstance(exc, ServiceError):
        log.exception("unhandled error on %s", path, exc_info=exc)
    elif info.status == 500:
        log.error("engine error on %s: %s", path, exc)


def _dotted(loc: Sequence[Any], in_request: bool) -> str | None:
    parts = [str(p) for p in loc]
    if in_request and parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


def validation_info(errors: Sequence[Any], style: str, in_request: bool = True) -> ErrorInfo:
    """A 422 ``validation_error`` (or 400 ``invalid_json``) from pydantic's error list; the
    locations of a request's errors start with where the value was (``body``, ``query``...),
    those of a WebSocket message (``in_request=False``) with the field itself."""
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        position = first["loc"][-1] if first.get("loc") else "?"
        return ErrorInfo(400, "invalid_json", f"request body is not valid JSON: {reason} at position {position}")
    # Never echo inputs back (they may be long user text): field, message and error kind only.
    details = [
        {"field": _dotted(e.get("loc", ()), in_request), "message": e.get("msg", ""), "type": e.get("type")}
        for e in errors
    ]
    first = details[0] if details else {"field": None, "message": "invalid request"}
    field = first["field"]
    if field is None and errors and errors[0].get("type") == "missing":
        message = "a JSON request body is required"
    elif field is None and errors and errors[0].get("type") in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object (sent with Content-Type: application/json)"
    elif errors and errors[0].get("type") == "extra_forbidden" and style == OPENAI:
        message = f"Unrecognized request argument supplied: {field}"  # OpenAI's wording
    else:
        message = f"{field}: {first['message']}" if field else str(first["message"])
    return ErrorInfo(422, "validation_error", message, field, details=details if len(details) > 1 else None)


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    style = api_style(request.url.path)
    return render_error(style, validation_info(exc.errors(), style))


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}


async def http_handler(request: Request, exc: StarletteHTTPException) -> Response:
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405:
        # Starlette lists only the first matching route's methods; a path may have several routes.
        from service.api.openapi import allowed_methods

        allow = ", ".join(allowed_methods(request.app, request.scope))
        headers = {**(headers or {}), "Allow": allow}
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=headers)
    kind = _HTTP_TYPES.get(exc.status_code, "http_error")
    return shaped_error(request, exc.status_code, kind, str(exc.detail), None, headers)


async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    info = describe_error(exc)
    _log_server_error(request.url.path, exc, info)
    return render_error(api_style(request.url.path), info)


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return shaped_error(request, 500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, service_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unhandled_handler)
