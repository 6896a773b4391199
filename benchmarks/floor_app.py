"""The keyboard section's floor: the service's stack answering a session socket with no work.

A FastAPI app on the same uvicorn (uvloop, the ``websockets`` protocol) with the service's
WebSocket route shape: ``/v1/sessions/stream`` sends a ``session`` message, then answers every
``{"seq": n, ...}`` message with a predictions reply of the service's size (five suggestions),
doing only what any handler must: receive the frame, parse its JSON, build the reply and encode
it. No session, no store, no model, no selection. The most typists it serves at p99 ≤ 50 ms
beside the same load generator is the most any service built this way can serve on the machine,
so the keyboard rows can say how far the real one is from it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

app = FastAPI()

_WORDS = ("the", "of", "and", "to", "a")


def _reply(seq: int | None, text: str) -> str:
    body: dict[str, Any] = {
        "type": "predictions", "seq": seq, "session_id": "s_floor000000000000000000000000000000",
        "model": "brown-lstm", "version": 3,
        "predictions": [{"word": w, "display": w, "probability": 0.1, "log_prob": -2.302585, "correction": False}
                        for w in _WORDS],
        "prefix": text.strip(), "prefix_probability": 1.0, "matches": 5, "context_words": 12,
        "committed_words": 12, "pending": text.strip(), "rebuilt": False, "expires_at": time.time() + 3600,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.websocket("/v1/sessions/stream")
async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text('{"type":"session","session_id":"s_floor000000000000000000000000000000"}')
    try:
        while True:
            data = json.loads(await websocket.receive_text())
            await websocket.send_text(_reply(data.get("seq"), data.get("text") or ""))
    except WebSocketDisconnect:
        return
