"""SIGTERM as the process itself handles it (``service/api/shutdown.py``): a real ``nextword-serve``
keeps serving while ``/readyz`` answers 503, then closes its WebSockets with 1012, stops accepting
connections, finishes the request in flight and exits. Plus the one rule the WebSocket close relies
on: a message that arrived is answered, never dropped, even when the close comes at that moment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.api.shutdown import Drain, StreamClosing


def http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_drains_then_stops(model_repository: Path, start_server: Callable) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    delay = 2.0
    env = {"NEXTWORD_SHUTDOWN_DELAY_SECONDS": str(delay), "NEXTWORD_LOG_LEVEL": "info"}
    server = start_server(model_repository, env=env, cli=True)
    port = int(server.url.rsplit(":", 1)[1])
    stack = contextlib.ExitStack()
    ws = stack.enter_context(connect(
        server.url.replace("http://", "ws://") + "/v1/sessions/stream?model=tiny&text=the%20", open_timeout=30
    ))
    assert json.loads(ws.recv(timeout=30))["type"] == "session"

    # A request in flight across the whole shutdown: headers and half the body sent now.
    body = json.dumps({"model": "tiny", "text": "the quick brown", "k": 3}).encode()
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])

    os.kill(server.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        # Draining: not ready, but alive and still serving (a balancer may still send work).
        ready = client.get("/readyz")
        assert (ready.status_code, ready.json()["ready"], ready.json()["draining"]) == (503, False, True)
        assert client.get("/v2/health/ready").status_code == 400
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/predict", json={"model": "tiny", "text": "the"}).status_code == 200
        ws.send(json.dumps({"seq": 1, "text": "cat "}))
        reply = json.loads(ws.recv(timeout=10))
        assert (reply["type"], reply["seq"], reply["committed_words"]) == ("predictions", 1, 2)
        assert time.monotonic() - sent < delay  # all of that happened inside the delay

    # Then the socket is closed with 1012 (service restart: reconnect elsewhere).
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    stack.close()
    assert time.monotonic() - sent >= delay - 0.1

    # New connections are refused; the request in flight still completes.
    deadline = time.monotonic() + 10
    while not refuses_connections(port):
        assert time.monotonic() < deadline, "the listener stayed open"
        time.sleep(0.05)
    assert server.alive()
    slow.sendall(body[10:])
    status, headers, payload = http_response(slow)
    assert status == 200 and json.loads(payload)["predictions"], payload
    assert headers.get("connection") == "close"
    slow.close()

    code = server.proc.wait(timeout=20)
    log = server.log_tail(20_000)
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "draining: /readyz answers 503 for 2 s" in log and "drained in" in log, log
    # uvicorn re-raises the signal it shut down for, so the exit status says SIGTERM (143).
    assert code == -signal.SIGTERM


def test_a_received_message_is_answered_not_dropped() -> None:
    """The close and a message arrive in the same loop iteration: the message wins; only a
    stream with nothing received is closed."""

    async def scenario() -> None:
        drain = Drain()
        queue: asyncio.Queue[str] = asyncio.Queue()
        waiting = asyncio.ensure_future(drain.receive(queue.get(), timeout=5))
        await asyncio.sleep(0)
        queue.put_nowait("message")
        closing = asyncio.ensure_future(drain.close_streams(timeout=1))
        assert await waiting == "message"
        await closing
        # Once closing, nothing more is read, and the message stays queued (never consumed).
        queue.put_nowait("later")
        with pytest.raises(StreamClosing):
            await drain.receive(queue.get(), timeout=5)
        assert queue.get_nowait() == "later"

        # An idle stream is woken by the close; its pending read is cancelled, consuming nothing.
        drain, queue = Drain(), asyncio.Queue()
        idle = asyncio.ensure_future(drain.receive(queue.get(), timeout=5))
        with drain.stream():
            await asyncio.sleep(0)
            closer = asyncio.ensure_future(drain.close_streams(timeout=5))
            with pytest.raises(StreamClosing):
                await idle
        await closer
        queue.put_nowait("after")
        assert queue.get_nowait() == "after"
        # The idle timeout still applies.
        with contextlib.suppress(StreamClosing), pytest.raises(TimeoutError):
            await Drain().receive(asyncio.Queue().get(), timeout=0.01)

    asyncio.run(scenario())
