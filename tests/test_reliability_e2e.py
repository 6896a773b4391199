"""Faults and resource use of a real server process (``nextword-serve``): what a client can do to
it by holding connections, and what it keeps afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_idle_websockets_leave_no_memory_behind(model_repository: Path, start_server: Callable) -> None:
    """500 idle session streams opened together and closed, again and again: the process's RSS
    does not grow (with permessage-deflate each socket held zlib buffers that stayed in the heap)."""
    from websockets.asyncio.client import connect

    server = start_server(model_repository, cli=True)
    sid = httpx.post(server.url + "/v1/sessions", json={"model": "tiny", "text": "the "}).json()["session_id"]
    url = server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"

    async def open_and_close(count: int) -> None:
        sockets = []
        try:
            for _ in range(count):
                ws = await connect(url, open_timeout=30)  # offers permessage-deflate, as browsers do
                assert '"type":"session"' in (await ws.recv()).replace(" ", "")
                sockets.append(ws)
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
        await asyncio.sleep(0.5)

    # The first round sets the heap's high-water mark for 500 open sockets (~15 MB); after that,
    # rounds must reuse it, not add to it (with deflate every round added ~18 MB).
    asyncio.run(open_and_close(500))
    before = rss_mb(server.proc.pid)
    for _ in range(2):
        asyncio.run(open_and_close(500))
    growth = rss_mb(server.proc.pid) - before
    assert growth < 8, f"RSS grew {growth:.0f} MB after 1,000 more idle WebSockets were opened and closed"


@pytest.fixture(scope="module")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    from conftest import _start_server

    srv = _start_server(model_repository, tmp_path_factory.mktemp("reliability-logs"), cli=True)
    try:
        yield srv
    finally:
        srv.stop()


DEEP = "[" * 2000 + "]" * 2000


def test_deeply_nested_json_is_a_clean_400_everywhere(server) -> None:
    """2,000 nested brackets made Python's parser raise RecursionError: a KServe 500 that also reset
    the keep-alive connection, and a WebSocket ``internal_error``. Now a 400 in each front end's
    shape, the connection stays usable, and the socket stays open."""
    from websockets.sync.client import connect

    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path, shape in [("/v1/predict", "native"), ("/v1/sessions", "native"), ("/openai/v1/completions", "openai"),
                            ("/v2/models/tiny/infer", "kserve"), ("/v2/models/tiny/versions/1/infer", "kserve")]:
            for body in (DEEP, '{"text": ' + DEEP + "}"):
                r = client.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400, (path, r.status_code, r.text)
                error = r.json()["error"]
                message = error if shape == "kserve" else error["message"]
                assert "levels deep; the limit is 32" in message, (path, r.text)
                if shape == "native":
                    assert error["type"] == "invalid_json"
                assert client.get("/healthz").status_code == 200  # same keep-alive connection
        assert client.post("/v1/predict", json={"text": "the " + "[" * 100}).status_code == 200  # inside a string
        sid = client.post("/v1/sessions", json={"model": "tiny", "text": "the "}).json()["session_id"]
    with connect(server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream") as ws:
        ws.recv(timeout=30)
        ws.send(DEEP)
        reply = json.loads(ws.recv(timeout=30))
        assert (reply["type"], reply["status"], reply["error"]["type"]) == ("error", 400, "invalid_json")
        ws.send(json.dumps({"seq": 1, "text": "cat "}))
        assert json.loads(ws.recv(timeout=30))["seq"] == 1  # still open


def test_logs_keep_no_session_ids_user_text_or_redis_address(model_repository: Path, start_server: Callable,
                                                             tmp_path: Path) -> None:
    """A session id is its bearer credential and ``?text=`` is what the user typed: neither belongs in
    the access log. Error bodies name no Redis address (the log does, for operators)."""
    from processes import free_port
    from websockets.sync.client import connect

    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    server = start_server(model_repository, cli=True, env={"NEXTWORD_LOG_LEVEL": "info"})
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = client.post("/v1/sessions", json={"model": "tiny", "text": "the "}).json()["session_id"]
        assert client.get(f"/v1/sessions/{sid}").status_code == 200
        assert client.post(f"/v1/sessions/{sid}/text", json={"text": "secretword "}).status_code == 200
    with connect(server.url.replace("http://", "ws://") + "/v1/sessions/stream?model=tiny&text=typedsecret%20") as ws:
        ws.recv(timeout=30)
    with connect(server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream") as ws:
        ws.recv(timeout=30)
    log = server.log_tail(200_000)
    assert "/v1/sessions/{session_id}" in log and "/v1/sessions/stream" in log  # the lines are there
    assert sid not in log and "typedsecret" not in log and "secretword" not in log

    redis_server = start_server(model_repository, env={"NEXTWORD_SESSION_STORE": dead_redis,
                                                       "NEXTWORD_SESSION_STORE_TIMEOUT_SECONDS": "0.5"})
    r = httpx.post(redis_server.url + "/v1/sessions", json={"model": "tiny"}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "session_store_unavailable"
    assert dead_redis.split(":")[-1].split("/")[0] not in r.text and "127.0.0.1" not in r.text


def test_trickling_clients_are_cut_off_while_others_are_served(model_repository: Path,
                                                              start_server: Callable) -> None:
    """Clients that connect and send nothing, trickle their headers, or trickle their body are cut off
    after the header/body timeouts; meanwhile ordinary requests are answered."""
    import socket
    import time
    from urllib.parse import urlsplit

    server = start_server(model_repository, cli=True, env={
        "NEXTWORD_HEADER_TIMEOUT_SECONDS": "1", "NEXTWORD_BODY_TIMEOUT_SECONDS": "1"})
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port

    def trickle(prefix: bytes, drip: bytes) -> tuple[float, bytes]:
        """Send ``prefix``, then ``drip`` a byte every 0.2 s (or just wait); (seconds until the server hung
        up, what it answered)."""
        sock = socket.create_connection((host, port))
        sock.settimeout(0.2)
        start = time.monotonic()
        reply = b""
        try:
            sock.sendall(prefix)
            for i in range(max(len(drip), 50)):
                if i < len(drip):
                    sock.sendall(drip[i:i + 1])
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                reply += chunk
                if time.monotonic() - start > 10:
                    break
        except OSError:
            pass
        finally:
            sock.close()
        return time.monotonic() - start, reply

    slow: list[tuple[float, bytes]] = []
    import threading

    headers = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    jobs = [(b"", b""), (b"POST /v1/pre", b"dict HTTP/1.1\r\nHost: x\r\n" * 10),
            (headers + b"Content-Length: 200\r\n\r\n", b'{"text": "' + b"a" * 150)]
    threads = [threading.Thread(target=lambda job=job: slow.append(trickle(*job))) for job in jobs * 3]
    for thread in threads:
        thread.start()
    served = 0
    with httpx.Client(base_url=server.url, timeout=10) as client:
        while any(t.is_alive() for t in threads):
            assert client.post("/v1/predict", json={"text": "the "}).status_code == 200
            served += 1
    for thread in threads:
        thread.join()
    assert served > 3
    assert len(slow) == 9 and all(seconds < 5 for seconds, _ in slow), [(round(s, 2), r[:12]) for s, r in slow]
    # Silent and header-trickling connections are closed without an answer; body-tricklers get a 408.
    body_replies = [reply for _, reply in slow if reply]
    assert len(body_replies) == 3 and all(b" 408 " in r and b"request_timeout" in r for r in body_replies)


def test_connection_cap(model_repository: Path, start_server: Callable) -> None:
    import socket
    from urllib.parse import urlsplit

    server = start_server(model_repository, cli=True, env={"NEXTWORD_MAX_CONNECTIONS": "4"})
    address = (urlsplit(server.url).hostname, urlsplit(server.url).port)
    idle = [socket.create_connection(address) for _ in range(4)]
    try:
        assert httpx.get(server.url + "/healthz").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/healthz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
