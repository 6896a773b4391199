"""Session errors and how they leave the service.

They carry their HTTP status and error type themselves (unlike engine errors, which stay
HTTP-free), because sessions exist only as an HTTP/WebSocket feature. :func:`error_body` turns any
exception a session call may raise (session, engine or validation error) into the service's error
shape ``{"error": {"type", "message", "field"}}`` plus its status and headers, so the WebSocket
transport sends exactly what the HTTP one would answer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.engine.errors import EngineError
from service.errors import engine_handler, error_response, shaped_error

log = logging.getLogger("service.sessions")


class SessionError(Exception):
    status: int = 400
    type: str = "session_error"

    def __init__(self, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers


class InvalidSessionIdError(SessionError):
    status = 422
    type = "invalid_session_id"

    def __init__(self) -> None:
        super().__init__(
            "session ids are 16 to 64 characters of A-Z, a-z, 0-9, '_' and '-' (as returned by POST /v1/sessions)",
            "session_id",
        )


class SessionNotFoundError(SessionError):
    status = 404
    type = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} does not exist (or was deleted); create a new one", "session_id")


class SessionExpiredError(SessionError):
    """The id existed but the session is gone: past its TTL, or evicted from a full store."""

    status = 404
    type = "session_expired"

    def __init__(self, session_id: str, reason: str = "expired") -> None:
        if reason == "evicted":
            message = f"session {session_id} was evicted (the session store was full); create a new one"
        else:
            message = f"session {session_id} expired (idle past its TTL); create a new one"
        super().__init__(message, "session_id")
        self.reason = reason


class SessionBusyError(SessionError):
    status = 409
    type = "session_busy"

    def __init__(self, session_id: str, waited: float) -> None:
        super().__init__(
            f"session {session_id} is being updated by another request and stayed locked for {waited:g} s; retry",
            "session_id", {"Retry-After": "1"},
        )


class SessionConflictError(SessionError):
    status = 409
    type = "session_conflict"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"the update of session {session_id} outlived its lock and was not saved; retry", "session_id",
            {"Retry-After": "1"},
        )


class SessionStoreUnavailableError(SessionError):
    status = 503
    type = "session_store_unavailable"

    def __init__(self, store: str, detail: str) -> None:
        super().__init__(
            f"the {store} session store is unavailable ({detail}); session calls fail until it is back, "
            "stateless endpoints (/v1/predict, /v1/score) keep working",
            None, {"Retry-After": "1"},
        )


class DeltaTooLongError(SessionError):
    status = 413
    type = "delta_too_long"

    def __init__(self, length: int, limit: int, field: str) -> None:
        super().__init__(f"{field} has {length} characters; the limit is {limit} (NEXTWORD_MAX_DELTA_CHARS)", field)


class PendingTooLongError(SessionError):
    status = 413
    type = "text_too_long"

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(
            f"the uncommitted word would be {length} characters long; the limit is {limit} "
            "(NEXTWORD_MAX_TEXT_CHARS): send whitespace to complete it",
            "text",
        )


class InvalidSessionInputError(SessionError):
    status = 422
    type = "validation_error"


async def session_error_handler(request: Request, exc: SessionError) -> JSONResponse:
    # Shaped by the path's protocol: sessions also back KServe sequences under /v2.
    return shaped_error(request, exc.status, exc.type, exc.message, exc.field, exc.headers)


@dataclass
class ErrorBody:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


async def error_body(exc: Exception, path: str = "websocket") -> ErrorBody:
    """The status and ``{"error": {...}}`` body the HTTP API would answer for ``exc``."""
    if isinstance(exc, SessionError):
        response = error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)
    elif isinstance(exc, EngineError):
        # The HTTP mapping of engine errors, reused as is (it only reads the path, for its log line).
        response = await engine_handler(SimpleNamespace(url=SimpleNamespace(path=path)), exc)  # type: ignore[arg-type]
    elif isinstance(exc, ValidationError):
        return validation_body(exc)
    else:
        log.exception("unhandled error on %s", path, exc_info=exc)
        response = error_response(500, "internal_error", "internal server error")
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return ErrorBody(response.status_code, json.loads(bytes(response.body)), headers)


def validation_body(exc: ValidationError) -> ErrorBody:
    """A pydantic validation error in the shape of the HTTP API's 422 ``validation_error``."""
    details = [
        {"field": ".".join(str(p) for p in e.get("loc", ())) or None, "message": e.get("msg", ""),
         "type": e.get("type")}
        for e in exc.errors()
    ]
    first = details[0] if details else {"field": None, "message": "invalid message"}
    message = f"{first['field']}: {first['message']}" if first["field"] else str(first["message"])
    body: dict[str, Any] = {"type": "validation_error", "message": message, "field": first["field"]}
    if len(details) > 1:
        body["details"] = details
    return ErrorBody(422, {"error": body})
