"""The service's exceptions, free of any web framework.

Every error raised on purpose is a :class:`ServiceError` carrying what a client needs: a
machine-readable ``type``, a ``message``, the offending request ``field`` (or ``None``), a
``status`` (the HTTP status code number, kept as a plain int so the engine and sessions stay usable
outside the web app: benchmarks, tests, other front ends) and, for "try again" errors,
``retry_after`` seconds. ``service/api/errors.py`` renders them in each front end's shape.
Session errors (``service/sessions/errors.py``) derive from the same base.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of everything the engine and the session manager raise on purpose."""

    type: str = "internal_error"
    status: int = 500
    field: str | None = None
    retry_after: float | None = None

    def __init__(self, message: str, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if field is not None:
            self.field = field
        if retry_after is not None:
            self.retry_after = retry_after


class EngineError(ServiceError):
    """Base class of the engine's errors; raised as such, an inference failure (500)."""

    type = "inference_error"


class DeviceUnavailableError(EngineError):
    """The configured device cannot be used (e.g. ``cuda`` without onnxruntime-gpu or a GPU)."""


class ModelLoadError(EngineError):
    """A model version failed to load, verify or self-check."""


class ModelNotFoundError(EngineError):
    type = "model_not_found"
    status = 404
    field = "model"

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} is not loaded")
        self.name = name


class VersionNotFoundError(EngineError):
    type = "version_not_found"
    status = 404
    field = "version"

    def __init__(self, name: str, version: int, reason: str | None = None) -> None:
        msg = f"version {version} of model {name!r} is not loaded"
        super().__init__(f"{msg}: {reason}" if reason else msg)
        self.name = name
        self.version = version


class NoModelLoadedError(EngineError):
    """The repository has no servable model at all (the service is not ready)."""

    type = "no_model_loaded"
    status = 503
    retry_after = 5.0

    def __init__(self) -> None:
        super().__init__("no model is loaded")


class QueueFullError(EngineError):
    """The batcher queue of a model version is at capacity: back off and retry."""

    type = "queue_full"
    status = 503

    def __init__(self, capacity: int, retry_after: float = 1.0) -> None:
        super().__init__(f"the model queue is full ({capacity} items waiting); retry later", retry_after=retry_after)
        self.capacity = capacity


class DeadlineExceededError(EngineError):
    type = "deadline_exceeded"
    status = 504

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request waited longer than its deadline of {timeout:g} s")
        self.timeout = timeout


class BatcherClosedError(EngineError):
    """The model version was unloaded between lookup and submission (the caller may re-resolve)."""

    type = "model_unavailable"
    status = 503
    retry_after = 1.0

    def __init__(self) -> None:
        super().__init__("the model version is being unloaded")


class InvalidInputError(EngineError):
    """Input the engine cannot run (e.g. scoring a text without words)."""

    type = "invalid_input"
    status = 422


class TextTooLongError(InvalidInputError):
    """Text over ``NEXTWORD_MAX_TEXT_CHARS``."""

    type = "text_too_long"
    status = 413

    def __init__(self, length: int, limit: int, field: str = "text") -> None:
        super().__init__(f"text has {length} characters; the limit is {limit} (NEXTWORD_MAX_TEXT_CHARS)", field)
        self.length = length
        self.limit = limit


class TooManyWordsError(TextTooLongError):
    """Text within ``NEXTWORD_MAX_TEXT_CHARS`` but with more words than scoring reads (HTTP 413)."""

    def __init__(self, count: int, limit: int, field: str = "text") -> None:
        InvalidInputError.__init__(
            self, f"text has {count} words; the most one request may score is {limit} (NEXTWORD_MAX_SCORE_WORDS)",
            field,
        )
        self.length = count
        self.limit = limit
