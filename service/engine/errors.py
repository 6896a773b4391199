"""Engine exceptions. They carry no HTTP status: ``service/errors.py`` maps them onto responses, so
the engine stays usable outside the web app (benchmarks, tests, other front ends)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of everything the engine raises on purpose."""


class DeviceUnavailableError(EngineError):
    """The configured device cannot be used (e.g. ``cuda`` without onnxruntime-gpu or a GPU)."""


class ModelLoadError(EngineError):
    """A model version failed to load, verify or self-check."""


class ModelNotFoundError(EngineError):
    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} is not loaded")
        self.name = name


class VersionNotFoundError(EngineError):
    def __init__(self, name: str, version: int, reason: str | None = None) -> None:
        msg = f"version {version} of model {name!r} is not loaded"
        super().__init__(f"{msg}: {reason}" if reason else msg)
        self.name = name
        self.version = version


class NoModelLoadedError(EngineError):
    """The repository has no servable model at all (the service is not ready)."""

    def __init__(self) -> None:
        super().__init__("no model is loaded")


class QueueFullError(EngineError):
    """The batcher queue of a model version is at capacity: back off and retry."""

    def __init__(self, capacity: int, retry_after: float = 1.0) -> None:
        super().__init__(f"the model queue is full ({capacity} items waiting); retry later")
        self.capacity = capacity
        self.retry_after = retry_after


class DeadlineExceededError(EngineError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request waited longer than its deadline of {timeout:g} s")
        self.timeout = timeout


class BatcherClosedError(EngineError):
    """The model version was unloaded between lookup and submission (the caller may re-resolve)."""

    def __init__(self) -> None:
        super().__init__("the model version is being unloaded")


class InvalidInputError(EngineError):
    """Input the engine cannot run (e.g. scoring a text without words)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TextTooLongError(InvalidInputError):
    """Text over ``NEXTWORD_MAX_TEXT_CHARS`` (HTTP 413)."""

    def __init__(self, length: int, limit: int, field: str = "text") -> None:
        super().__init__(f"text has {length} characters; the limit is {limit} (NEXTWORD_MAX_TEXT_CHARS)", field)
        self.length = length
        self.limit = limit
