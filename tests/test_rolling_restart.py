"""A rolling restart under load: two ``nextword-serve`` replicas share a real ``redis-server`` while
typists keep updating their sessions, HTTP typists on both replicas (retrying a failed request on
the other one) and WebSocket typists on the replica being replaced (reconnecting on close).
A new replica starts, the old one gets SIGTERM (the Deployment's rolling update), and:
no session is lost, no request fails on both replicas, every WebSocket close is a 1012, and
every session's text reads exactly as typed (each delta applied once: the predictions equal
stateless ``/v1/predict`` on the whole text)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from processes import REDIS_SERVER, RedisServer

from nextword.text import split_text

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt install redis-server)"),
]

PASSAGE = "the quick brown fox jumps over the lazy dog . she said that they had not been there . "


def deltas(offset: int) -> list[str]:
    """The passage in chunks of 1 to 5 characters, as a keyboard sends them."""
    text = PASSAGE[offset:] + PASSAGE[:offset]
    out, i = [], 0
    while i < len(text):
        size = 1 + (i * 7 + offset) % 5
        out.append(text[i:i + size])
        i += size
    return out


@dataclass
class Typist:
    name: str
    session_id: str = ""
    text: str = ""
    last_reply: dict = field(default_factory=dict)
    updates: int = 0
    retried: int = 0
    reconnects: int = 0
    close_codes: list[int] = field(default_factory=list)
    failure: str | None = None


def probabilities(body: dict) -> dict[str, float]:
    return {p["word"]: p["probability"] for p in body["predictions"]}


def test_rolling_restart_loses_no_session_and_fails_no_retried_request(
    model_repository: Path, start_server: Callable, tmp_path: Path
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    redis = RedisServer(tmp_path).start()
    env = {"NEXTWORD_SESSION_STORE": redis.url, "NEXTWORD_SHUTDOWN_DELAY_SECONDS": "1"}
    try:
        with ThreadPoolExecutor(2) as pool:
            old, other = pool.map(lambda _: start_server(model_repository, env=env, cli=True), range(2))
        replicas = [old.url, other.url]  # what a client can reach; the restart edits it
        stop = threading.Event()

        def http_typist(t: Typist, offset: int) -> None:
            clients: dict[str, httpx.Client] = {}

            def post(path: str, body: dict, start: int) -> dict:
                urls = list(replicas)
                for k in range(len(urls)):
                    url = urls[(start + k) % len(urls)]
                    client = clients.setdefault(url, httpx.Client(base_url=url, timeout=30))
                    try:
                        r = client.post(path, json=body)
                    except httpx.TransportError:
                        t.retried += 1  # refused, or closed before answering: never applied
                        continue
                    if r.status_code == 503:
                        t.retried += 1
                        continue
                    assert r.status_code in (200, 201), r.text
                    return r.json()
                raise AssertionError(f"{path} failed on every replica: {urls}")

            try:
                first = post("/v1/sessions", {"model": "tiny", "k": 20}, offset)
                t.session_id = first["session_id"]
                for n, delta in enumerate(deltas(offset) * 50):
                    if stop.is_set():
                        break
                    t.last_reply = post(f"/v1/sessions/{t.session_id}/text", {"text": delta}, n)
                    t.text += delta
                    t.updates += 1
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                t.failure = f"{type(exc).__name__}: {exc}"
            finally:
                for client in clients.values():
                    client.close()

        def ws_typist(t: Typist, offset: int) -> None:
            try:
                created = httpx.post(old.url + "/v1/sessions", json={"model": "tiny", "k": 20}, timeout=30)
                t.session_id = created.json()["session_id"]
                pending = deltas(offset) * 50
                seq, target = 0, old.url  # streams start on the replica that will be replaced
                while pending and not stop.is_set():
                    url = target.replace("http://", "ws://") + f"/v1/sessions/{t.session_id}/stream"
                    with connect(url, open_timeout=30) as ws:
                        assert json.loads(ws.recv(timeout=30))["type"] == "session"
                        try:
                            while pending and not stop.is_set():
                                seq += 1
                                ws.send(json.dumps({"seq": seq, "text": pending[0]}))
                                reply = json.loads(ws.recv(timeout=30))
                                assert (reply["type"], reply["seq"]) == ("predictions", seq), reply
                                t.text += pending.pop(0)
                                t.last_reply = reply
                                t.updates += 1
                        except ConnectionClosed as closed:
                            # The unanswered delta was not applied: resend it elsewhere.
                            t.close_codes.append(closed.rcvd.code if closed.rcvd else 1006)
                            t.reconnects += 1
                            target = next(u for u in list(replicas) if u != target)
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                t.failure = f"{type(exc).__name__}: {exc}"

        typists = [Typist(f"http-{i}") for i in range(4)] + [Typist(f"ws-{i}") for i in range(2)]
        threads = [threading.Thread(target=http_typist if t.name.startswith("http") else ws_typist, args=(t, 11 * i))
                   for i, t in enumerate(typists)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)

        # The rolling update: the new replica is ready first, then the old one is told to go.
        new = start_server(model_repository, env=env, cli=True)
        replicas.append(new.url)
        os.kill(old.proc.pid, signal.SIGTERM)
        old.proc.wait(timeout=60)
        time.sleep(0.5)  # clients still try it for a while (a balancer's endpoint update lags too)
        replicas.remove(old.url)
        time.sleep(1.0)  # typing goes on without it
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

        assert [t.failure for t in typists] == [None] * len(typists)
        ws = [t for t in typists if t.name.startswith("ws")]
        assert all(t.reconnects >= 1 and set(t.close_codes) == {1012} for t in ws), [t.close_codes for t in ws]
        assert sum(t.updates for t in typists) > 50
        with httpx.Client(base_url=new.url, timeout=30) as client:
            for t in typists:
                info = client.get(f"/v1/sessions/{t.session_id}")
                assert info.status_code == 200, (t.name, info.text)
                typed = split_text(t.text)  # the service's own reading of the text
                assert (info.json()["committed_words"], info.json()["pending"]) == (len(typed.committed), typed.pending)
                want = client.post("/v1/predict", json={"model": "tiny", "k": 20, "text": t.text}).json()
                got, expected = probabilities(t.last_reply), probabilities(want)
                assert set(got) == set(expected), t.name
                assert all(abs(got[w] - p) <= 1e-5 for w, p in expected.items()), t.name
    finally:
        redis.stop()
