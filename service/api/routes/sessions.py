"""Stateful sessions over HTTP (``/v1/sessions...``) and WebSocket (``/v1/sessions/.../stream``).

WebSocket protocol (JSON text frames):

* ``/v1/sessions/stream?model=&version=&k=&ttl_seconds=&text=`` creates a session; the first
  message is ``{"type": "session", ...SessionInfo, "predictions": {...}}`` (the session_id to
  reconnect with). ``/v1/sessions/{session_id}/stream`` continues one; its first message is
  ``{"type": "session", ...SessionInfo}``.
* The client sends ``{"seq": n, "text": "..."}`` and/or ``{"seq": n, "replace_pending": "..."}``
  (optional ``k``, ``learn``, ``filter``, ``corrections``); each is answered in order by
  ``{"type": "predictions", "seq": n, ...}``.
* A bad message is answered ``{"type": "error", "seq": n|null, "status": <HTTP status>,
  "error": {"type", "message", "field"}}`` (the HTTP error body) and the socket stays open. If the
  session is gone (deleted, expired) the error is followed by close code 1008; a stream that
  cannot start is closed after its error with 1008 (bad request, unknown session) or 1013 (try
  again later: e.g. the session store is unreachable).
* A socket idle for the session's TTL is closed with code 1000 and a reason.
* When the process shuts down (``service/api/shutdown.py``), every socket is closed with 1012 after
  the reply to the message in flight, if any: a message that got no reply was not applied, so
  the client reconnects (to any replica) and resends it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response, WebSocket
from starlette.websockets import WebSocketDisconnect

from service.api.access import principal
from service.api.body import CheckedRoute, json_too_deep
from service.api.deps import SessionsDep
from service.api.errors import error_body
from service.api.protocol.native import MAX_K, ErrorResponse
from service.api.protocol.sessions import (
    SessionCreateRequest,
    SessionInfo,
    SessionPredictions,
    SessionUpdateRequest,
    StreamMessage,
    StreamOpenQuery,
)
from service.api.routes.predict import word_probability
from service.api.shutdown import SERVICE_RESTART, Drain, StreamClosing
from service.engine import SuggestOptions
from service.sessions import SessionManager, SessionRecord, SessionResult
from service.sessions.errors import SessionError, SessionExpiredError, SessionNotFoundError

log = logging.getLogger("service.sessions.stream")

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=CheckedRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON or non-UTF-8 body"},
    404: {"model": ErrorResponse, "description": "session_not_found, session_expired (recreate it), "
          "model_not_found, version_not_found"},
    409: {"model": ErrorResponse, "description": "session_busy: another update of the session held it too long"},
    413: {"model": ErrorResponse, "description": "delta_too_long, text_too_long, payload_too_large"},
    422: {"model": ErrorResponse, "description": "validation_error, invalid_session_id, invalid_input"},
    503: {"model": ErrorResponse, "description": "session_store_unavailable (Redis down), queue_full, "
          "no_model_loaded (see Retry-After)"},
    504: {"model": ErrorResponse, "description": "Deadline exceeded while queued"},
}

IDLE_CLOSE = 1000
SESSION_GONE_CLOSE = 1008
TRY_AGAIN_LATER_CLOSE = 1013


def info_of(record: SessionRecord) -> SessionInfo:
    return SessionInfo(
        session_id=record.id, model=record.model, version=record.version, committed_words=record.committed,
        context_words=record.context, pending=record.pending, k=record.k, learn=record.learn, rotate=record.rotate,
        filter=record.filter, corrections=record.corrections, ttl_seconds=record.ttl,
        created=record.created, last_used=record.last_used, expires_at=record.expires_at,
    )


def predictions_of(result: SessionResult) -> SessionPredictions:
    record = result.record
    return SessionPredictions(
        session_id=record.id, model=record.model, version=record.version,
        predictions=[word_probability(c) for c in result.candidates],
        prefix=result.prefix, prefix_probability=result.prefix_probability, matches=result.matches,
        context_words=result.context_words, committed_words=record.committed, pending=record.pending,
        rebuilt=result.rebuilt, expires_at=record.expires_at,
    )


def predictions_body(result: SessionResult) -> dict[str, Any]:
    """``predictions_of(result).model_dump()`` built directly: the per-keystroke paths (the
    WebSocket message, the HTTP update) skip constructing and dumping the pydantic model, which
    cost more than answering a keystroke from the cache."""
    record = result.record
    return {
        "session_id": record.id, "model": record.model, "version": record.version,
        "predictions": [{"word": c.word, "display": c.display, "probability": c.probability,
                         "log_prob": c.log_prob, "correction": c.correction} for c in result.candidates],
        "prefix": result.prefix, "prefix_probability": result.prefix_probability, "matches": result.matches,
        "context_words": result.context_words, "committed_words": record.committed, "pending": record.pending,
        "rebuilt": result.rebuilt, "expires_at": record.expires_at,
    }


def _json(value: Any) -> bytes:
    """Compact UTF-8 JSON, as starlette's send_json and JSONResponse write it, by orjson: once per
    keystroke, ~1 µs against ~11 µs for the json module. A non-finite float is written null, as
    the pydantic-serialised responses write it (the json module would write an invalid
    ``Infinity``)."""
    return orjson.dumps(value)


# --------------------------------------------------------------------------- HTTP


@router.post("", status_code=201, response_model=SessionPredictions, responses=_ERRORS)
async def create_session(body: SessionCreateRequest, sessions: SessionsDep, request: Request) -> SessionPredictions:
    """Open a session (optionally with initial text) and predict the next word."""
    result = await sessions.create(body.model, body.version, body.text, body.k, body.ttl_seconds,
                                   learn=body.learn, rotate=body.rotate, owner=principal(request.scope),
                                   options=SuggestOptions(body.filter, body.corrections))
    return predictions_of(result)


@router.post("/{session_id}/text", response_model=SessionPredictions, responses=_ERRORS)
async def append_text(session_id: str, body: SessionUpdateRequest, sessions: SessionsDep, request: Request) -> Response:
    """Append a text delta (and/or replace the uncommitted fragment) and predict the next word.

    Only words followed by whitespace are committed to the recurrent state; the trailing fragment
    stays pending (a prefix to complete) until whitespace or punctuation completes it."""
    result = await sessions.update(session_id, body.text, body.replace_pending, body.k, learn=body.learn,
                                   owner=principal(request.scope), filter=body.filter, corrections=body.corrections)
    return Response(_json(predictions_body(result)), media_type="application/json")


@router.get("/{session_id}", response_model=SessionInfo, responses=_ERRORS)
async def get_session(session_id: str, sessions: SessionsDep, request: Request) -> SessionInfo:
    """Model, version, committed word count, pending fragment and timestamps (does not extend the TTL)."""
    return info_of(await sessions.get(session_id, principal(request.scope)))


@router.delete("/{session_id}", status_code=204, response_class=Response, responses=_ERRORS)
async def delete_session(session_id: str, sessions: SessionsDep, request: Request) -> Response:
    await sessions.delete(session_id, principal(request.scope))
    return Response(status_code=204)


# --------------------------------------------------------------------------- WebSocket


async def _send_error(websocket: WebSocket, exc: Exception, seq: int | None) -> int:
    error = error_body(exc, websocket.url.path)
    await websocket.send_json({"type": "error", "seq": seq, "status": error.status, **error.body})
    return error.status


async def _refuse(websocket: WebSocket, exc: Exception) -> None:
    """The stream cannot start: say why, then close (1008 for a client problem, 1013 "try again
    later" when the service cannot serve it right now, e.g. Redis unreachable)."""
    status = await _send_error(websocket, exc, None)
    code = TRY_AGAIN_LATER_CLOSE if status >= 500 else SESSION_GONE_CLOSE
    await websocket.close(code, reason=str(getattr(exc, "message", exc)).encode()[:120].decode(errors="ignore"))


async def _restarting(websocket: WebSocket) -> None:
    await websocket.close(SERVICE_RESTART, reason="server restarting: reconnect, resend unanswered messages")


async def _accept(websocket: WebSocket) -> SessionManager | None:
    """Accept a session socket; while the server drains, close it at once (1012) and answer None."""
    await websocket.accept()
    if websocket.app.state.drain.closing:
        await _restarting(websocket)
        return None
    return websocket.app.state.sessions


@router.websocket("/stream")
async def stream_new_session(websocket: WebSocket) -> None:
    sessions = await _accept(websocket)
    if sessions is None:
        return
    try:
        query = StreamOpenQuery.model_validate(dict(websocket.query_params))
        result = await sessions.create(query.model, query.version, query.text, query.k, query.ttl_seconds,
                                       learn=query.learn, rotate=query.rotate, owner=principal(websocket.scope),
                                       options=SuggestOptions(query.filter, query.corrections))
    except Exception as exc:
        await _refuse(websocket, exc)
        return
    info, predictions = info_of(result.record).model_dump(), predictions_of(result).model_dump()
    await websocket.send_json({"type": "session", **info, "predictions": predictions})
    with websocket.app.state.drain.stream():
        await _serve(websocket, sessions, result.record)


@router.websocket("/{session_id}/stream")
async def stream_session(websocket: WebSocket, session_id: str) -> None:
    sessions = await _accept(websocket)
    if sessions is None:
        return
    try:
        record = await sessions.get(session_id, principal(websocket.scope))
    except Exception as exc:
        await _refuse(websocket, exc)
        return
    await websocket.send_json({"type": "session", **info_of(record).model_dump()})
    with websocket.app.state.drain.stream():
        await _serve(websocket, sessions, record)


async def _serve(websocket: WebSocket, sessions: SessionManager, record: SessionRecord) -> None:
    """Answer the socket's messages in order until it closes, idles past the TTL, the session goes
    or the process shuts down.

    This runs once per keystroke, so the common message takes a lean path: a well-formed message
    is checked by hand (anything else goes through ``StreamMessage`` for its exact error), and
    the reply is built as a dict and encoded once."""
    session_id, idle = record.id, record.ttl
    drain: Drain = websocket.app.state.drain
    try:
        while True:
            try:
                message = await drain.receive(websocket.receive(), idle)
            except TimeoutError:
                await websocket.close(IDLE_CLOSE, reason=f"idle for {idle:g} s (the session TTL)")
                return
            except StreamClosing:
                await _restarting(websocket)
                return
            if message["type"] == "websocket.disconnect":
                return
            seq: int | None = None
            try:
                data = _message_data(message)
                seq = data.get("seq") if type(data.get("seq")) is int else None
                fields = _common_message(data)
                if fields is None:
                    parsed = StreamMessage.model_validate(data)
                    fields = (parsed.text, parsed.replace_pending, parsed.k, parsed.learn, parsed.filter,
                              parsed.corrections)
                text, replace, k, learn, filter_, corrections = fields
                result = await sessions.update(session_id, text, replace, k, transport="websocket", learn=learn,
                                               owner=record.owner, filter=filter_, corrections=corrections)
            except (SessionNotFoundError, SessionExpiredError) as exc:
                await _send_error(websocket, exc, seq)
                await websocket.close(SESSION_GONE_CLOSE, reason=exc.type)
                return
            except Exception as exc:
                await _send_error(websocket, exc, seq)
                continue
            await websocket.send_text(_json({"type": "predictions", "seq": seq, **predictions_body(result)}).decode())
    except WebSocketDisconnect:
        return


def _message_data(message: dict[str, Any]) -> dict[str, Any]:
    text = message.get("text")
    if text is None:
        raise _MessageError("binary frames are not supported: send JSON text messages")
    too_deep = json_too_deep(text)
    if too_deep:
        raise _MessageError(f"message is not valid: {too_deep}", "invalid_json", 400)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _MessageError(f"message is not valid JSON: {exc.msg} at position {exc.pos}",
                            "invalid_json", 400) from None
    if not isinstance(data, dict):
        raise _MessageError('a message must be a JSON object like {"seq": 1, "text": "the "}')
    return data


_MESSAGE_FIELDS = frozenset(StreamMessage.model_fields)


def _common_message(
    data: dict[str, Any],
) -> tuple[str | None, str | None, int | None, bool, bool | None, bool | None] | None:
    """``(text, replace_pending, k, learn, filter, corrections)`` of a message that
    ``StreamMessage`` would accept unchanged (exact JSON types, known fields, ``k`` in range),
    else None."""
    if type(data.get("seq")) is not int or not _MESSAGE_FIELDS.issuperset(data):
        return None
    text, replace, k = data.get("text"), data.get("replace_pending"), data.get("k")
    if (text is not None and type(text) is not str) or (replace is not None and type(replace) is not str):
        return None
    if k is not None and (type(k) is not int or not 1 <= k <= MAX_K):
        return None
    learn = data.get("learn", True)
    if type(learn) is not bool:
        return None
    filter_, corrections = data.get("filter"), data.get("corrections")
    if any(flag is not None and type(flag) is not bool for flag in (filter_, corrections)):
        return None
    return text, replace, k, learn, filter_, corrections


class _MessageError(SessionError):
    """A socket message that is not a valid request (answered like the HTTP body errors)."""

    def __init__(self, message: str, type_: str = "validation_error", status: int = 422) -> None:
        super().__init__(message)
        self.type = type_
        self.status = status
