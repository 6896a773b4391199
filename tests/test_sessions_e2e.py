"""Sessions as deployed: a real ``redis-server`` (free loopback port, no persistence) shared by two
uvicorn replicas. A session created on one continues on the other (HTTP and WebSocket) with the
predictions stateless ``/v1/predict`` gives for the whole text, and keeps going after the first
replica is killed with SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from processes import REDIS_SERVER, RedisServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt install redis-server)"),
]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path).start()
    try:
        yield server.url
    finally:
        server.stop()


def probabilities(body: dict) -> dict[str, float]:
    return {p["word"]: p["probability"] for p in body["predictions"]}


def assert_matches_predict(client: httpx.Client, body: dict, text: str) -> None:
    want = client.post("/v1/predict", json={"text": text, "k": 100, "model": "tiny"}).json()
    assert (body["prefix"], body["context_words"]) == (want["prefix"], want["context_words"]), text
    got, expected = probabilities(body), probabilities(want)
    assert set(got) == set(expected), text
    assert all(abs(got[w] - p) <= 1e-5 for w, p in expected.items()), text


def test_session_moves_between_replicas_and_survives_sigkill(
    model_repository: Path, start_server: Callable, redis_url: str
) -> None:
    from websockets.sync.client import connect

    env = {"NEXTWORD_SESSION_STORE": redis_url, "NEXTWORD_MAX_QUEUE_DELAY_MS": "0"}
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: start_server(model_repository, env=env), range(2))
    text = "The quick brown"
    with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
        r = on_a.post("/v1/sessions", json={"model": "tiny", "text": text, "k": 100})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]

        # Created on A, continued on B, then on A again: both replicas answer the same.
        for client, delta in [(on_b, " fox jum"), (on_a, "ps over "), (on_b, "the la")]:
            text += delta
            r = client.post(f"/v1/sessions/{sid}/text", json={"text": delta})
            assert r.status_code == 200, r.text
            assert_matches_predict(on_a, r.json(), text)
            assert_matches_predict(on_b, r.json(), text)

        # The same session streamed over a WebSocket on B.
        ws_url = b.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"
        with connect(ws_url, open_timeout=30) as ws:
            hello = json.loads(ws.recv(timeout=30))
            assert (hello["type"], hello["session_id"], hello["pending"]) == ("session", sid, "la")
            for seq, delta in enumerate(["zy", " dog", ". "], start=1):
                ws.send(json.dumps({"seq": seq, "text": delta}))
            replies = [json.loads(ws.recv(timeout=30)) for _ in range(3)]
        text += "zy dog. "
        assert [r["seq"] for r in replies] == [1, 2, 3]
        assert_matches_predict(on_b, replies[-1], text)

        # A dies hard; B carries on with the session's state from Redis.
        os.killpg(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        r = on_b.post(f"/v1/sessions/{sid}/text", json={"text": "She sa"})
        assert r.status_code == 200, r.text
        text += "She sa"
        assert_matches_predict(on_b, r.json(), text)
        info = on_b.get(f"/v1/sessions/{sid}").json()
        assert (info["committed_words"], info["pending"], info["version"]) == (12, "sa", 2)

        # A stream that opens its own session announces it first.
        with connect(b.url.replace("http://", "ws://") + "/v1/sessions/stream?model=tiny&k=100&text=the%20",
                     open_timeout=30) as ws:
            first = json.loads(ws.recv(timeout=30))
            assert first["type"] == "session" and first["predictions"]["committed_words"] == 1
            ws.send(json.dumps({"seq": 1, "text": "cat"}))
            reply = json.loads(ws.recv(timeout=30))
        assert reply["seq"] == 1
        assert_matches_predict(on_b, reply, "the cat")
        assert on_b.get(f"/v1/sessions/{first['session_id']}").status_code == 200


HOLD_LOCK = """
import asyncio, sys
from service.config import Settings
from service.sessions.manager import create_store

async def main() -> None:
    store = create_store(Settings(session_store=sys.argv[1]))
    await store.start()
    async with store.lock(sys.argv[2]):
        print("locked", flush=True)
        await asyncio.sleep(3600)  # an update that never ends: only SIGKILL stops it

asyncio.run(main())
"""


def test_lock_of_a_killed_replica_is_free_within_two_seconds(redis_url: str, tmp_path: Path) -> None:
    """A process holding a session's update lock keeps it as long as it lives (the lease is renewed,
    however long its update takes) and, SIGKILLed, frees it within 2 s (it took the whole
    request-deadline-sized lease, ~15 s)."""
    import asyncio
    import subprocess
    import sys
    import time

    from conftest import ROOT

    from service.config import Settings
    from service.sessions.errors import SessionBusyError
    from service.sessions.manager import create_store

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, redis_url, "s" * 20], stdout=subprocess.PIPE,
                              env=env, cwd=ROOT, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"

        async def scenario() -> tuple[bool, float]:
            store = create_store(Settings(session_store=redis_url, session_lock_timeout_seconds=0.2))
            await store.start()
            try:
                await asyncio.sleep(2 * Settings().session_lock_lease_seconds)  # past several leases
                try:
                    async with store.lock("s" * 20):
                        held_while_alive = False
                except SessionBusyError:
                    held_while_alive = True
                os.killpg(holder.pid, signal.SIGKILL)
                holder.wait(10)
                killed = time.monotonic()
                while True:
                    try:
                        async with store.lock("s" * 20):
                            return held_while_alive, time.monotonic() - killed
                    except SessionBusyError:
                        assert time.monotonic() - killed < 10
            finally:
                await store.close()

        held_while_alive, freed_after = asyncio.run(scenario())
        assert held_while_alive, "the lock expired while its holder was alive and working"
        assert freed_after < 2.0, f"the dead holder's lock was free only after {freed_after:.1f} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
