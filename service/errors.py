"""Every error leaves the service as one JSON shape per protocol family, chosen by path prefix:

* native API: ``{"error": {"type", "message", "field"}}``;
* ``/openai/...``: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``type``
  ``invalid_request_error`` for client errors, ``server_error`` otherwise; ``code`` is the native
  type; validation problems are 400 as OpenAI answers them, not 422);
* ``/v2/...`` (KServe v2 / Open Inference Protocol): ``{"error": "<message>"}``, 400 for bad input.

Engine exceptions (HTTP-free) are mapped to statuses here; FastAPI's own validation errors and
Starlette's HTTP errors are reshaped; request bodies are checked for size and UTF-8 before
FastAPI parses them (:class:`CheckedRoute`), so a bad byte gives a 400 naming the problem rather
than a generic parse failure. Client-caused problems are 4xx; 5xx is reserved for the service's
own state (no model, queue full, deadline) and real bugs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.errors import (
    BatcherClosedError,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    ModelNotFoundError,
    NoModelLoadedError,
    QueueFullError,
    TextTooLongError,
    VersionNotFoundError,
)

log = logging.getLogger("service.errors")


class BodyError(Exception):
    """A request body rejected before parsing."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


def error_response(
    status: int,
    type_: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "message": message, "field": field}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


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


def openai_error_body(status: int, type_: str, message: str, field: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (also sent as a ``data:`` event when a stream fails midway)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": field, "code": type_}}


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
    style = api_style(request.url.path)
    if style == OPENAI:
        status = 400 if status == 422 else status
        return JSONResponse(openai_error_body(status, type_, message, field), status_code=status, headers=headers)
    if style == KSERVE:
        return JSONResponse({"error": message}, status_code=400 if status == 422 else status, headers=headers)
    return error_response(status, type_, message, field, headers, details)


def _dotted(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        position = first["loc"][-1] if first.get("loc") else "?"
        return shaped_error(
            request, 400, "invalid_json", f"request body is not valid JSON: {reason} at position {position}"
        )
    # Never echo inputs back (they may be long user text): field, message and error kind only.
    details = [{"field": _dotted(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")} for e in errors]
    first = details[0] if details else {"field": None, "message": "invalid request"}
    field = first["field"]
    if field is None and errors and errors[0].get("type") == "missing":
        message = "a JSON request body is required"
    elif field is None and errors and errors[0].get("type") in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object (sent with Content-Type: application/json)"
    elif errors and errors[0].get("type") == "extra_forbidden" and api_style(request.url.path) == OPENAI:
        message = f"Unrecognized request argument supplied: {field}"  # OpenAI's wording
    else:
        message = f"{field}: {first['message']}" if field else str(first["message"])
    return shaped_error(
        request, 422, "validation_error", message, field, details=details if len(details) > 1 else None
    )


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}


async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers) if exc.headers else None
    kind = _HTTP_TYPES.get(exc.status_code, "http_error")
    return shaped_error(request, exc.status_code, kind, str(exc.detail), None, headers)


async def body_handler(request: Request, exc: BodyError) -> JSONResponse:
    return shaped_error(request, exc.status, exc.type, exc.message)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))}


def describe_engine_error(exc: EngineError) -> tuple[int, str, str, str | None, dict[str, str] | None]:
    """``(status, type, message, field, headers)`` of an engine error; also used by streaming
    endpoints to report an error after the response has started."""
    if isinstance(exc, TextTooLongError):
        return 413, "text_too_long", str(exc), exc.field, None
    if isinstance(exc, InvalidInputError):
        return 422, "invalid_input", str(exc), exc.field, None
    if isinstance(exc, ModelNotFoundError):
        return 404, "model_not_found", str(exc), "model", None
    if isinstance(exc, VersionNotFoundError):
        return 404, "version_not_found", str(exc), "version", None
    if isinstance(exc, NoModelLoadedError):
        return 503, "no_model_loaded", str(exc), None, _retry_after(5)
    if isinstance(exc, QueueFullError):
        return 503, "queue_full", str(exc), None, _retry_after(exc.retry_after)
    if isinstance(exc, BatcherClosedError):
        return 503, "model_unavailable", str(exc), None, _retry_after(1)
    if isinstance(exc, DeadlineExceededError):
        return 504, "deadline_exceeded", str(exc), None, None
    return 500, "inference_error", str(exc), None, None


async def engine_handler(request: Request, exc: EngineError) -> JSONResponse:
    status, type_, message, field, headers = describe_engine_error(exc)
    if status == 500:
        log.error("engine error on %s: %s", request.url.path, exc)
    return shaped_error(request, status, type_, message, field, headers)


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return shaped_error(request, 500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_handler)  # type: ignore[arg-type]
    app.add_exception_handler(BodyError, body_handler)  # type: ignore[arg-type]
    app.add_exception_handler(EngineError, engine_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unhandled_handler)


class CheckedRoute(APIRoute):
    """An APIRoute that reads the body itself first: bounded by ``max_body_bytes`` (413) and
    strictly UTF-8 (400 ``invalid_encoding``), then hands the cached body to FastAPI's parser."""

    require_utf8: ClassVar[bool] = True

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                settings = getattr(request.app.state, "settings", None)
                limit = settings.max_body_bytes if settings is not None else 1 << 20
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise BodyError(413, "payload_too_large", f"request body is {declared} bytes; the limit is {limit}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise BodyError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
                request._body = body  # Starlette's cache: FastAPI's parser reads it from here
                if not self.require_utf8:
                    return await handler(request)
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BodyError(
                        400, "invalid_encoding", f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
                    ) from None
            return await handler(request)

        return checked


class BinaryBodyRoute(CheckedRoute):
    """A :class:`CheckedRoute` for bodies that may carry binary data (the KServe binary tensor
    extension): size-bounded but not required to be UTF-8; the handler parses them itself."""

    require_utf8 = False
