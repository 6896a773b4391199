"""The keyboard section's floor: the service's stack answering a session socket with no work.

A FastAPI app on the same uvicorn (uvloop, the ``websockets`` protocol) with the service's
WebSocket route shape: ``/v1/sessions/stream`` sends a ``session`` message, then answers every
``{"seq": n, ...}`` message with the service's own predictions reply (``predictions_body`` of a
fixed five-suggestion result, encoded as the service encodes it), doing only what any handler
must: receive the frame, parse its JSON, build the reply and encode it. No session, no store, no
model, no selection. The most typists it serves at p99 ≤ 50 ms beside the same load generator is
the most any service built this way can serve on the machine, so the keyboard rows can say how
far the real one is from it.
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from service.api.routes.sessions import _json, predictions_body
from service.engine.suggest import Candidate
from service.sessions.manager import SessionResult
from service.sessions.store import SessionRecord

app = FastAPI()

_RESULT = SessionResult(
    record=SessionRecord(id="s_floor000000000000000000000000000000", model="brown-lstm", version=3,
                         created=time.time(), last_used=time.time(), ttl=3600.0, committed=12, context=12),
    candidates=[Candidate(w, i, -2.302585, 0.1) for i, w in enumerate(("the", "of", "and", "to", "a"))],
    prefix="", prefix_probability=1.0, matches=5, context_words=12, rebuilt=False,
)


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.websocket("/v1/sessions/stream")
async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(_json({"type": "session", "session_id": _RESULT.record.id}).decode())
    try:
        while True:
            data = json.loads(await websocket.receive_text())
            await websocket.send_text(_json({"type": "predictions", "seq": data.get("seq"),
                                             **predictions_body(_RESULT)}).decode())
    except WebSocketDisconnect:
        return
