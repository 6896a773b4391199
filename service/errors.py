"""Every error leaves the service as one JSON shape: ``{"error": {"type", "message", "field"}}``.

Engine exceptions (HTTP-free) are mapped to statuses here; FastAPI's own validation errors and
Starlette's HTTP errors are reshaped; request bodies are checked for size and UTF-8 before
FastAPI parses them (:class:`CheckedRoute`), so a bad byte gives a 400 naming the problem rather
than a generic parse failure. Client-caused problems are 4xx; 5xx is reserved for the service's
own state (no model, queue full, deadline) and real bugs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

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
        return error_response(400, "invalid_json", f"request body is not valid JSON: {reason} at position {position}")
    # Never echo inputs back (they may be long user text): field, message and error kind only.
    details = [{"field": _dotted(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")} for e in errors]
    first = details[0] if details else {"field": None, "message": "invalid request"}
    field = first["field"]
    if field is None and errors and errors[0].get("type") == "missing":
        message = "a JSON request body is required"
    elif field is None and errors and errors[0].get("type") in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object (sent with Content-Type: application/json)"
    else:
        message = f"{field}: {first['message']}" if field else str(first["message"])
    return error_response(422, "validation_error", message, field, details=details if len(details) > 1 else None)


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}


async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers) if exc.headers else None
    kind = _HTTP_TYPES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, kind, str(exc.detail), None, headers)


async def body_handler(request: Request, exc: BodyError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))}


async def engine_handler(request: Request, exc: EngineError) -> JSONResponse:
    if isinstance(exc, TextTooLongError):
        return error_response(413, "text_too_long", str(exc), exc.field)
    if isinstance(exc, InvalidInputError):
        return error_response(422, "invalid_input", str(exc), exc.field)
    if isinstance(exc, ModelNotFoundError):
        return error_response(404, "model_not_found", str(exc), "model")
    if isinstance(exc, VersionNotFoundError):
        return error_response(404, "version_not_found", str(exc), "version")
    if isinstance(exc, NoModelLoadedError):
        return error_response(503, "no_model_loaded", str(exc), headers=_retry_after(5))
    if isinstance(exc, QueueFullError):
        return error_response(503, "queue_full", str(exc), headers=_retry_after(exc.retry_after))
    if isinstance(exc, BatcherClosedError):
        return error_response(503, "model_unavailable", str(exc), headers=_retry_after(1))
    if isinstance(exc, DeadlineExceededError):
        return error_response(504, "deadline_exceeded", str(exc))
    log.error("engine error on %s: %s", request.url.path, exc)
    return error_response(500, "inference_error", str(exc))


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_handler)  # type: ignore[arg-type]
    app.add_exception_handler(BodyError, body_handler)  # type: ignore[arg-type]
    app.add_exception_handler(EngineError, engine_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unhandled_handler)


class CheckedRoute(APIRoute):
    """An APIRoute that reads the body itself first: bounded by ``max_body_bytes`` (413) and
    strictly UTF-8 (400 ``invalid_encoding``), then hands the cached body to FastAPI's parser."""

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
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BodyError(
                        400, "invalid_encoding", f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
                    ) from None
            return await handler(request)

        return checked
