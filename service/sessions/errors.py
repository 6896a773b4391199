"""Session errors: :class:`~service.engine.errors.ServiceError` subclasses (a type, a message, a
field, a status and, for "retry" errors, ``retry_after``), rendered by ``service/api/errors.py``
like every other error, over HTTP and the WebSocket alike.
"""

from __future__ import annotations

from service.engine.errors import ServiceError


class SessionError(ServiceError):
    status = 400
    type = "session_error"


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
            "session_id", retry_after=1,
        )


class SessionConflictError(SessionError):
    status = 409
    type = "session_conflict"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"the update of session {session_id} outlived its lock and was not saved; retry", "session_id",
            retry_after=1,
        )


class SessionStoreUnavailableError(SessionError):
    status = 503
    type = "session_store_unavailable"

    def __init__(self, store: str, detail: str) -> None:
        super().__init__(
            f"the {store} session store is unavailable ({detail}); session calls fail until it is back, "
            "stateless endpoints (/v1/predict, /v1/score) keep working",
            retry_after=1,
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
