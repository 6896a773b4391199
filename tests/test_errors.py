"""The error table: what each of the service's own errors becomes in the native, OpenAI and
KServe shapes, over HTTP, on the WebSocket and inside a stream that has already started."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from service.api.errors import KSERVE, NATIVE, OPENAI, describe_error, error_body, render_error
from service.engine.errors import (
    BatcherClosedError,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    ModelNotFoundError,
    NoModelLoadedError,
    QueueFullError,
    ServiceError,
    TextTooLongError,
    VersionNotFoundError,
)
from service.sessions.errors import (
    DeltaTooLongError,
    SessionBusyError,
    SessionExpiredError,
    SessionStoreUnavailableError,
)

# (error, status, type, field, Retry-After)
CASES = [
    (TextTooLongError(12, 10, "items.0.text"), 413, "text_too_long", "items.0.text", None),
    (InvalidInputError("no words", "text"), 422, "invalid_input", "text", None),
    (ModelNotFoundError("x"), 404, "model_not_found", "model", None),
    (VersionNotFoundError("x", 3), 404, "version_not_found", "version", None),
    (NoModelLoadedError(), 503, "no_model_loaded", None, "5"),
    (QueueFullError(8, retry_after=2.6), 503, "queue_full", None, "3"),
    (QueueFullError(8, retry_after=0.1), 503, "queue_full", None, "1"),
    (BatcherClosedError(), 503, "model_unavailable", None, "1"),
    (DeadlineExceededError(1.5), 504, "deadline_exceeded", None, None),
    (EngineError("inference failed: boom"), 500, "inference_error", None, None),
    (SessionExpiredError("abcdefghijklmnop"), 404, "session_expired", "session_id", None),
    (SessionBusyError("abcdefghijklmnop", 5), 409, "session_busy", "session_id", "1"),
    (SessionStoreUnavailableError("redis", "down"), 503, "session_store_unavailable", None, "1"),
    (DeltaTooLongError(11, 10, "replace_pending"), 413, "delta_too_long", "replace_pending", None),
    (RuntimeError("a bug"), 500, "internal_error", None, None),
]


@pytest.mark.parametrize(("exc", "status", "type_", "field", "retry"), CASES, ids=lambda c: type(c).__name__)
def test_each_error_in_each_shape(exc: Exception, status: int, type_: str, field: str | None,
                                  retry: str | None) -> None:
    info = describe_error(exc)
    message = str(exc) if isinstance(exc, ServiceError) else "internal server error"
    client = 400 if status == 422 else status

    native = render_error(NATIVE, info)
    assert native.status_code == status
    assert json.loads(native.body) == {"error": {"type": type_, "message": message, "field": field}}
    assert native.headers.get("retry-after") == retry

    openai = render_error(OPENAI, info)
    kind = "invalid_request_error" if client < 500 else "server_error"
    assert openai.status_code == client
    assert json.loads(openai.body) == {"error": {"message": message, "type": kind, "param": field, "code": type_}}

    kserve = render_error(KSERVE, info)
    assert kserve.status_code == client and json.loads(kserve.body) == {"error": message}

    ws = error_body(exc)  # a WebSocket error message carries the native body and the status
    assert (ws.status, ws.body) == (status, json.loads(native.body))
    assert ws.headers == ({"Retry-After": retry} if retry else {})


def test_an_error_after_a_generation_stream_started_is_an_error_event() -> None:
    from service.api.routes.generate import _stream
    from service.engine.generate import CompletionResult, FinishEvent

    async def failing() -> AsyncIterator[FinishEvent]:
        raise DeadlineExceededError(2)
        yield  # an async generator

    first = FinishEvent(0, CompletionResult(0, "", (), "stop", 0.0, 0.0, 1))

    async def collect() -> list[str]:
        return [chunk async for chunk in _stream(None, first, failing())]  # type: ignore[arg-type]

    chunks = asyncio.run(collect())
    assert chunks == [
        'event: error\ndata: {"status":504,"error":{"type":"deadline_exceeded",'
        '"message":"the request waited longer than its deadline of 2 s","field":null}}\n\n'
    ]
