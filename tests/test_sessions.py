"""Stateful sessions in-process (Starlette TestClient, lifespan included): the HTTP and WebSocket
API, exactness against stateless ``/v1/predict`` over random chunkings (hypothesis), O(w) cost and
cross-session batching, serialised concurrent updates, TTL/LRU, version rebuilds, limits and bad
input, metrics; and the same against a real ``redis-server`` (skipped when it is not installed):
compact state, TTL in Redis, cross-app locking, Redis stopping and coming back."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from processes import REDIS_SERVER, RedisServer
from prometheus_client import REGISTRY
from starlette.websockets import WebSocketDisconnect

from nextword.text import split_text
from service import metrics
from service.config import Settings
from service.main import create_app
from service.sessions import MemoryStore, SessionRecord
from service.sessions.errors import SessionBusyError, SessionExpiredError, SessionNotFoundError

pytestmark = pytest.mark.timeout(300)

ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None,
                                 reason="redis-server is not installed (apt install redis-server)")

# Words of the tiny test vocabulary (tests/conftest.py), a few unknown ones, punctuation, spaces.
PIECES = ["the", "quick", "brown", "fox", "apple", "apply", "qu", "th", "she", "said", "don't", "u.s.", "mr.",
          "1960s", "cat", "sat", "on", "mat", "zebra", ".", ",", "!", "?", "'", '"', "(", ")", "-", " ", " ", " ",
          "  ", "\n"]
ALL = 100  # k larger than the tiny vocabulary: every eligible word comes back


def settings_for(repository: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model_repository=repository, device="cpu", intra_op_threads=1, reload_interval_seconds=0,
        log_level="warning", max_delta_chars=200, max_text_chars=2000, session_max_ttl_seconds=3600,
        session_sweep_interval_seconds=0, max_queue_delay_ms=0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(model_repository))) as test_client:
        yield test_client


def error_of(response: Any, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"type", "message", "field"} <= set(body["error"]), body
    assert body["error"]["type"] == type_, body
    return body["error"]


def as_probs(body: dict) -> dict[str, float]:
    return {p["word"]: p["probability"] for p in body["predictions"]}


def assert_same_predictions(session: dict, stateless: dict, where: object = "") -> None:
    assert session["prefix"] == stateless["prefix"], where
    assert session["matches"] == stateless["matches"], where
    assert session["context_words"] == stateless["context_words"], where
    got, want = as_probs(session), as_probs(stateless)
    assert set(got) == set(want), where
    for word, p in want.items():
        assert abs(got[word] - p) <= 1e-5, (where, word, got[word], p)
    assert abs(session["prefix_probability"] - stateless["prefix_probability"]) <= 1e-5, where


def predict(client: TestClient, text: str, model: str | None = None, version: int | None = None) -> dict:
    r = client.post("/v1/predict", json={"text": text, "k": ALL, "model": model, "version": version})
    assert r.status_code == 200, r.text
    return r.json()


def create(client: TestClient, **body: Any) -> dict:
    r = client.post("/v1/sessions", json={"k": ALL, **body})
    assert r.status_code == 201, r.text
    return r.json()


def append(client: TestClient, sid: str, text: str | None = None, **body: Any) -> dict:
    if text is not None:
        body["text"] = text
    r = client.post(f"/v1/sessions/{sid}/text", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def counter(metric: Any, *labels: str) -> float:
    return sample(metric._name + "_total", **dict(zip(metric._labelnames, labels, strict=True)))


def histogram_count(metric: Any, *labels: str) -> float:
    return sample(metric._name + "_count", **dict(zip(metric._labelnames, labels, strict=True)))


def gauge(metric: Any, *labels: str) -> float:
    return sample(metric._name, **dict(zip(metric._labelnames, labels, strict=True)))


# --------------------------------------------------------------------------- HTTP API


def test_session_lifecycle(client: TestClient) -> None:
    body = create(client, text="The quick brown fo")
    sid = body["session_id"]
    assert ID.fullmatch(sid)
    assert (body["model"], body["version"], body["prefix"], body["pending"]) == ("tiny", 2, "fo", "fo")
    assert body["committed_words"] == 3 and body["rebuilt"] is False and body["expires_at"] > time.time()
    assert_same_predictions(body, predict(client, "The quick brown fo"))

    body = append(client, sid, "x ")
    assert (body["prefix"], body["pending"], body["committed_words"]) == ("", "", 4)
    assert_same_predictions(body, predict(client, "The quick brown fox "))

    info = client.get(f"/v1/sessions/{sid}")
    assert info.status_code == 200
    info = info.json()
    assert {k: info[k] for k in ("session_id", "model", "version", "committed_words", "pending")} == {
        "session_id": sid, "model": "tiny", "version": 2, "committed_words": 4, "pending": ""}
    assert info["created"] <= info["last_used"] < info["expires_at"]
    assert info["ttl_seconds"] == pytest.approx(1800)

    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    error_of(client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    error_of(client.post(f"/v1/sessions/{sid}/text", json={"text": "a"}), 404, "session_not_found")
    error_of(client.delete(f"/v1/sessions/{sid}"), 404, "session_not_found")


def test_session_stays_on_its_version(client: TestClient) -> None:
    body = create(client, model="tinygru", text="she said", version=1)
    assert (body["model"], body["version"]) == ("tinygru", 1)
    old = create(client, version=1, text="the ")
    assert old["version"] == 1
    body = append(client, old["session_id"], "cat sat")
    assert body["version"] == 1 and not body["rebuilt"]
    assert_same_predictions(body, predict(client, "the cat sat", version=1))


def test_backspace_and_correction_with_replace_pending(client: TestClient) -> None:
    sid = create(client, text="the qu")["session_id"]
    body = append(client, sid, replace_pending="q")  # one backspace
    assert (body["prefix"], body["pending"]) == ("q", "q")
    assert_same_predictions(body, predict(client, "the q"))
    body = append(client, sid, replace_pending="")  # the whole fragment deleted
    assert (body["prefix"], body["pending"], body["committed_words"]) == ("", "", 1)
    assert_same_predictions(body, predict(client, "the "))
    body = append(client, sid, "k", replace_pending="quic")  # correction, then more typing
    assert body["pending"] == "quick"
    body = append(client, sid, " fox", replace_pending="brown")  # completes and commits the fragment
    assert (body["pending"], body["committed_words"]) == ("fox", 2)
    assert_same_predictions(body, predict(client, "the brown fox"))


def _exact_after_deltas(client: TestClient, text: str, cuts: list[int], model: str) -> None:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(points, points[1:], strict=False)]
    body = create(client, model=model, text=deltas[0] if deltas else "")
    for delta in deltas[1:]:
        body = append(client, body["session_id"], delta)
    assert_same_predictions(body, predict(client, text, model), (text, deltas))
    split = split_text(text)
    assert body["committed_words"] == len(split.committed)
    assert body["pending"] == split.pending


@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=14),
    cuts=st.lists(st.integers(0, 200), max_size=8),
    model=st.sampled_from(["tiny", "tinygru"]),
)
def test_any_chunking_equals_stateless_predict(client: TestClient, pieces: list[str], cuts: list[int],
                                               model: str) -> None:
    """Whatever way a text is chopped into deltas (splitting words, punctuation, whitespace), the
    predictions after the last delta equal /v1/predict on the whole text."""
    _exact_after_deltas(client, "".join(pieces), cuts, model)


@pytest.mark.parametrize("text", ["the", "Mr. Smith of the U.S", "She said: \"don't!\" (u.s.) 1960s, th"])
def test_character_by_character_equals_stateless_predict(client: TestClient, text: str) -> None:
    _exact_after_deltas(client, text, list(range(len(text))), "tiny")


@hypothesis_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(), st.lists(st.sampled_from(PIECES), max_size=3), st.integers(0, 6)),
                    min_size=1, max_size=8))
def test_typing_with_corrections_equals_stateless_predict(client: TestClient,
                                                          ops: list[tuple[bool, list[str], int]]) -> None:
    """Appends mixed with replace_pending (backspaces, rewrites): the session predicts what
    /v1/predict predicts for the text the user now sees."""
    text = ""
    sid = create(client)["session_id"]
    body: dict = {}
    for replace, pieces, backspaces in ops:
        delta = "".join(pieces)
        if replace:
            pending = split_text(text).pending
            fragment = pending[: max(0, len(pending) - backspaces)] + delta
            text = text[: len(text) - len(pending)] + fragment
            body = append(client, sid, replace_pending=fragment)
        else:
            text += delta
            body = append(client, sid, delta)
    assert_same_predictions(body, predict(client, text), (ops, text))


# --------------------------------------------------------------------------- cost and batching


def test_one_delta_costs_its_own_words_in_one_batch(client: TestClient) -> None:
    """A delta committing w words runs w + 1 + tail tokens in one onnxruntime call, however long the
    history is."""
    history = "the cat sat on the mat and the dog " * 30  # 270 words
    sid = create(client, text=history)["session_id"]
    for delta, tokens in [("sat ", 1 + 2), ("on the mat ", 3 + 4), ("and th", 1 + 2), ("e dog", 1 + 1 + 1)]:
        runs = histogram_count(metrics.INFERENCE_DURATION, "tiny", "2", "step")
        fed = counter(metrics.TOKENS, "tiny", "step")
        body = append(client, sid, delta)
        assert histogram_count(metrics.INFERENCE_DURATION, "tiny", "2", "step") - runs == 1, delta
        assert counter(metrics.TOKENS, "tiny", "step") - fed == tokens, delta
    assert body["committed_words"] == 270 + 6


def test_steps_of_many_sessions_share_batches(client: TestClient) -> None:
    app = client.app
    manager = app.state.sessions
    lv = app.state.engine.repository.resolve("tiny")
    texts = [f"the cat {'sat on the mat ' * (i % 4)}and " for i in range(16)]
    ids = [create(client, text=t)["session_id"] for t in texts]
    expected = [predict(client, t + "the dog ") for t in texts]

    async def together() -> list:
        return await asyncio.gather(*(manager.update(sid, "the dog ", k=ALL) for sid in ids))

    runs = histogram_count(metrics.INFERENCE_DURATION, "tiny", "2", "step")
    delay, lv.batcher.max_queue_delay = lv.batcher.max_queue_delay, 0.2  # time for companions, however busy
    try:
        results = client.portal.call(together)
    finally:
        lv.batcher.max_queue_delay = delay
    batches = histogram_count(metrics.INFERENCE_DURATION, "tiny", "2", "step") - runs
    assert batches <= 4, f"32 rows of 16 sessions took {batches} onnxruntime calls"
    for result, want in zip(results, expected, strict=True):
        got = {c.word: c.probability for c in result.candidates}
        assert got == pytest.approx(as_probs(want), abs=1e-5)


def test_concurrent_updates_of_one_session_are_serialised(client: TestClient) -> None:
    sid = create(client, text="the ")["session_id"]
    manager = client.app.state.sessions

    async def together() -> list:
        return await asyncio.gather(*(manager.update(sid, "cat ", k=ALL) for _ in range(12)))

    results = client.portal.call(together)
    assert sorted(r.record.committed for r in results) == list(range(2, 14))
    assert client.get(f"/v1/sessions/{sid}").json()["committed_words"] == 13
    final = append(client, sid, "")
    assert_same_predictions(final, predict(client, "the " + "cat " * 12))


def test_update_waits_for_a_held_session_then_gives_up(client: TestClient) -> None:
    sid = create(client, text="the ")["session_id"]
    manager = client.app.state.sessions

    async def scenario() -> None:
        store = manager.store
        timeout, store.lock_timeout = store.lock_timeout, 0.2
        try:
            async with store.lock(sid):
                with pytest.raises(SessionBusyError):
                    await manager.update(sid, "cat ")
        finally:
            store.lock_timeout = timeout
        assert (await manager.update(sid, "cat ")).record.committed == 2

    client.portal.call(scenario)


# --------------------------------------------------------------------------- limits and bad input


def test_bad_input_gets_clear_errors(client: TestClient) -> None:
    sid = create(client, text="the ")["session_id"]
    for bad in ["short", "x" * 65, "has space in it!!", "dots.are.not.allowed", "ümlautümlautümlaut"]:
        error_of(client.get(f"/v1/sessions/{bad}"), 422, "invalid_session_id")
        error_of(client.post(f"/v1/sessions/{bad}/text", json={"text": "a"}), 422, "invalid_session_id")
        error_of(client.delete(f"/v1/sessions/{bad}"), 422, "invalid_session_id")
    error_of(client.get("/v1/sessions/" + "A" * 32), 404, "session_not_found")
    error_of(client.post(f"/v1/sessions/{sid}/text", json={"text": "a" * 201}), 413, "delta_too_long")
    error_of(client.post(f"/v1/sessions/{sid}/text", json={"replace_pending": "a" * 201}), 413, "delta_too_long")
    again = client.post(f"/v1/sessions/{sid}/text", json={"k": 2})  # no text: the predictions again
    assert again.status_code == 200 and len(again.json()["predictions"]) == 2, again.text
    error_of(client.post(f"/v1/sessions/{sid}/text", json={"tetx": "a"}), 422, "validation_error")
    error_of(client.post(f"/v1/sessions/{sid}/text", json={"text": "a", "k": 0}), 422, "validation_error")
    lone_surrogate = client.post(f"/v1/sessions/{sid}/text", content=b'{"text": "\\ud800"}',
                                 headers={"content-type": "application/json"})
    error_of(lone_surrogate, 422, "invalid_input")
    bad_json = client.post(f"/v1/sessions/{sid}/text", content=b"{not json",
                           headers={"content-type": "application/json"})
    error_of(bad_json, 400, "invalid_json")
    for ttl in [0, -5]:
        error_of(client.post("/v1/sessions", json={"ttl_seconds": ttl}), 422, "validation_error")
    error = error_of(client.post("/v1/sessions", json={"ttl_seconds": 3601}), 422, "validation_error")
    assert error["field"] == "ttl_seconds" and "3600" in error["message"]
    error_of(client.post("/v1/sessions", json={"text": "a" * 2001}), 413, "text_too_long")
    error_of(client.post("/v1/sessions", json={"model": "nope"}), 404, "model_not_found")
    error_of(client.post("/v1/sessions", json={"model": "tiny", "version": 9}), 404, "version_not_found")
    # A fragment that never ends cannot grow past the text limit.
    for _ in range(12):
        r = client.post(f"/v1/sessions/{sid}/text", json={"text": "a" * 200})
        if r.status_code != 200:
            break
    error_of(r, 413, "text_too_long")
    assert append(client, sid, " ")["committed_words"] == 2  # still usable


def test_expired_session_says_so(client: TestClient) -> None:
    before = counter(metrics.SESSIONS_EXPIRED, "memory")
    sid = create(client, text="the ", ttl_seconds=1)["session_id"]
    time.sleep(1.2)
    error = error_of(client.post(f"/v1/sessions/{sid}/text", json={"text": "cat"}), 404, "session_expired")
    assert "expired" in error["message"] and error["field"] == "session_id"
    error_of(client.get(f"/v1/sessions/{sid}"), 404, "session_expired")
    assert counter(metrics.SESSIONS_EXPIRED, "memory") - before == 1


def test_memory_store_evicts_least_recently_used_and_expires() -> None:
    now = [1000.0]
    store = MemoryStore(max_sessions=3, clock=lambda: now[0])

    def record(sid: str, ttl: float = 60) -> SessionRecord:
        return SessionRecord(id=sid, model="m", version=1, created=now[0], last_used=now[0], ttl=ttl)

    async def scenario() -> None:
        evicted = counter(metrics.SESSIONS_EVICTED, "memory")
        expired = counter(metrics.SESSIONS_EXPIRED, "memory")
        active = gauge(metrics.SESSIONS_ACTIVE, "memory")
        for sid in ("a" * 16, "b" * 16, "c" * 16):
            await store.create(record(sid))
        touched = await store.load("a" * 16)
        async with store.lock("a" * 16) as lock:
            await store.save(touched, lock)  # a is now the most recently used
        await store.create(record("d" * 16))
        with pytest.raises(SessionExpiredError) as info:
            await store.load("b" * 16)
        assert info.value.reason == "evicted"
        assert counter(metrics.SESSIONS_EVICTED, "memory") - evicted == 1
        now[0] += 61
        await store.sweep()
        assert len(store) == 0
        assert counter(metrics.SESSIONS_EXPIRED, "memory") - expired == 3
        assert gauge(metrics.SESSIONS_ACTIVE, "memory") == active
        with pytest.raises(SessionExpiredError):
            await store.load("a" * 16)
        with pytest.raises(SessionNotFoundError):
            await store.load("e" * 16)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- model versions


def test_unloaded_version_rebuilds_on_the_serving_one(repository_copy: Path) -> None:
    settings = settings_for(repository_copy, session_rebuild_words=4)
    with TestClient(create_app(settings)) as c:
        sid = create(c, text="the cat sat on the mat and the dog ")["session_id"]
        pinned = create(c, model="tiny", version=1, text="the ")["session_id"]
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 2
        shutil.rmtree(repository_copy / "tiny" / "2")
        assert c.post("/v1/models/reload").json()["unloaded"] == ["tiny/2"]

        body = append(c, sid, "sat o")
        assert (body["version"], body["rebuilt"], body["committed_words"]) == (1, True, 10)
        # The state was rebuilt from the last 4 committed words, then the delta was read.
        assert_same_predictions(body, predict(c, "mat and the dog sat o", "tiny", 1))
        body = append(c, sid, "n ")
        assert (body["version"], body["rebuilt"]) == (1, False)
        assert_same_predictions(body, predict(c, "mat and the dog sat on ", "tiny", 1))
        info = c.get(f"/v1/sessions/{sid}").json()
        assert (info["version"], info["committed_words"], info["context_words"]) == (1, 11, 6)

        body = append(c, pinned, "cat ")  # its version is still loaded: no rebuild
        assert (body["version"], body["rebuilt"]) == (1, False)


# --------------------------------------------------------------------------- WebSocket


def test_websocket_streams_predictions_in_order(client: TestClient) -> None:
    text = "The quick brown fox jumps over the la"
    with client.websocket_connect("/v1/sessions/stream?model=tinygru&k=100") as ws:
        first = ws.receive_json()
        assert first["type"] == "session" and ID.fullmatch(first["session_id"])
        assert first["model"] == "tinygru" and first["predictions"]["prefix"] == ""
        sid = first["session_id"]
        deltas = [text[i:i + 3] for i in range(0, len(text), 3)]
        for seq, delta in enumerate(deltas, start=1):
            ws.send_json({"seq": seq, "text": delta})
        replies = [ws.receive_json() for _ in deltas]
    assert [r["seq"] for r in replies] == list(range(1, len(deltas) + 1))
    assert all(r["type"] == "predictions" and r["session_id"] == sid for r in replies)
    assert_same_predictions(replies[-1], predict(client, text, "tinygru"))

    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        hello = ws.receive_json()
        assert (hello["type"], hello["session_id"], hello["pending"]) == ("session", sid, "la")
        ws.send_json({"seq": 7, "replace_pending": "l", "k": 100})
        reply = ws.receive_json()
    assert reply["seq"] == 7
    assert_same_predictions(reply, predict(client, text[:-1], "tinygru"))


def test_websocket_bad_messages_get_errors_not_a_dropped_socket(client: TestClient) -> None:
    with client.websocket_connect("/v1/sessions/stream?text=the%20") as ws:
        sid = ws.receive_json()["session_id"]
        ws.send_text("not json")
        error = ws.receive_json()
        assert (error["type"], error["seq"], error["status"], error["error"]["type"]) == (
            "error", None, 400, "invalid_json")
        ws.send_json({"seq": 2, "text": 3})
        error = ws.receive_json()
        assert (error["seq"], error["status"], error["error"]["type"], error["error"]["field"]) == (
            2, 422, "validation_error", "text")
        ws.send_json({"seq": 3})  # no text: the predictions again, as over HTTP
        reply = ws.receive_json()
        assert (reply["type"], reply["seq"]) == ("predictions", 3)
        ws.send_json({"seq": 4, "text": "x" * 201})
        error = ws.receive_json()
        assert (error["seq"], error["status"], error["error"]["type"]) == (4, 413, "delta_too_long")
        ws.send_json([1, 2])
        assert ws.receive_json()["error"]["type"] == "validation_error"
        ws.send_bytes(b"\x00\x01")
        assert ws.receive_json()["error"]["type"] == "validation_error"
        ws.send_json({"seq": 5, "text": "cat "})
        reply = ws.receive_json()
        assert (reply["type"], reply["seq"], reply["committed_words"]) == ("predictions", 5, 2)
        client.delete(f"/v1/sessions/{sid}")
        ws.send_json({"seq": 6, "text": "sat"})
        error = ws.receive_json()
        assert (error["seq"], error["status"], error["error"]["type"]) == (6, 404, "session_not_found")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008

    with client.websocket_connect("/v1/sessions/" + "B" * 20 + "/stream") as ws:
        assert ws.receive_json()["error"]["type"] == "session_not_found"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()
    with client.websocket_connect("/v1/sessions/stream?ttl_seconds=0") as ws:
        assert ws.receive_json()["error"]["type"] == "validation_error"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()


def test_idle_websocket_is_closed_cleanly_after_the_ttl(client: TestClient) -> None:
    with client.websocket_connect("/v1/sessions/stream?ttl_seconds=1") as ws:
        ws.receive_json()
        start = time.monotonic()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1000 and "idle" in closed.value.reason
    assert 0.9 <= time.monotonic() - start < 10


# --------------------------------------------------------------------------- metrics and schema


def test_session_metrics_and_openapi(client: TestClient) -> None:
    created = counter(metrics.SESSIONS_CREATED, "memory")
    deleted = counter(metrics.SESSIONS_DELETED, "memory")
    http_updates = histogram_count(metrics.SESSION_UPDATE_DURATION, "http")
    ws_updates = histogram_count(metrics.SESSION_UPDATE_DURATION, "websocket")
    sid = create(client)["session_id"]
    append(client, sid, "the ")
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        ws.receive_json()
        ws.send_json({"seq": 1, "text": "cat "})
        ws.receive_json()
    client.delete(f"/v1/sessions/{sid}")
    assert counter(metrics.SESSIONS_CREATED, "memory") - created == 1
    assert counter(metrics.SESSIONS_DELETED, "memory") - deleted == 1
    assert histogram_count(metrics.SESSION_UPDATE_DURATION, "http") - http_updates == 1
    assert histogram_count(metrics.SESSION_UPDATE_DURATION, "websocket") - ws_updates == 1
    text = client.get("/metrics").text
    assert 'nextword_sessions_active{store="memory"}' in text
    assert 'route="/v1/sessions/{session_id}/text"' in text
    assert sid not in text

    paths = client.get("/openapi.json").json()["paths"]
    assert {"post"} <= set(paths["/v1/sessions"])
    assert {"get", "delete"} <= set(paths["/v1/sessions/{session_id}"])
    assert "post" in paths["/v1/sessions/{session_id}/text"]
    update = paths["/v1/sessions/{session_id}/text"]["post"]["requestBody"]["content"]["application/json"]
    assert update["schema"]["$ref"].endswith("SessionUpdateRequest")


# --------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@needs_redis
def test_redis_store_sessions(model_repository: Path, redis_server: RedisServer) -> None:
    settings = settings_for(model_repository, session_store=redis_server.url, session_lock_timeout_seconds=0.3)
    with TestClient(create_app(settings)) as c:
        body = create(c, model="tiny", text="The quick br", ttl_seconds=30)
        sid = body["session_id"]
        assert_same_predictions(body, predict(c, "The quick br"))
        for delta in ["own fox ", "jumps", " over th"]:
            body = append(c, sid, delta)
        assert_same_predictions(body, predict(c, "The quick brown fox jumps over th"))

        raw = redis_server.client()
        key = f"nextword:session:{sid}"
        fields = raw.hgetall(key)
        assert set(fields) == {b"meta", b"state", b"last_id"}
        meta = json.loads(fields[b"meta"])
        assert (meta["model"], meta["version"], meta["committed"], meta["pending"]) == ("tiny", 2, 6, "th")
        layers, hidden = meta["state_shape"]
        assert meta["state_names"] and len(fields[b"state"]) == 4 * layers * hidden * len(meta["state_names"])
        state = np.frombuffer(fields[b"state"], dtype="<f4")
        assert np.isfinite(state).all() and np.abs(state).sum() > 0
        assert 0 < raw.pttl(key) <= 30_000
        assert raw.exists(f"nextword:session-seen:{sid}")

        info = c.get(f"/v1/sessions/{sid}").json()
        assert (info["committed_words"], info["pending"], info["ttl_seconds"]) == (6, "th", 30)

        # Another replica holding the session's lock: the update waits, then answers 409.
        raw.set(f"nextword:session-lock:{sid}", "another-replica", px=10_000)
        busy = c.post(f"/v1/sessions/{sid}/text", json={"text": "e"})
        error_of(busy, 409, "session_busy")
        assert busy.headers["retry-after"] == "1"
        raw.delete(f"nextword:session-lock:{sid}")
        assert append(c, sid, "e")["pending"] == "the"
        assert not raw.keys("nextword:session-lock:*")  # released after use
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        assert not raw.exists(key) and not raw.exists(f"nextword:session-seen:{sid}")
        error_of(c.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
        error_of(c.delete(f"/v1/sessions/{sid}"), 404, "session_not_found")
        error_of(c.get("/v1/sessions/" + "C" * 40), 404, "session_not_found")

        # TTL enforced by Redis; the marker tells the client it expired (counted once).
        expired = counter(metrics.SESSIONS_EXPIRED, "redis")
        short = create(c, text="the ", ttl_seconds=1)["session_id"]
        time.sleep(1.3)
        assert not raw.exists(f"nextword:session:{short}")
        error_of(c.post(f"/v1/sessions/{short}/text", json={"text": "cat"}), 404, "session_expired")
        error_of(c.get(f"/v1/sessions/{short}"), 404, "session_expired")
        assert counter(metrics.SESSIONS_EXPIRED, "redis") - expired == 1

        # WebSocket on the Redis store too.
        with c.websocket_connect("/v1/sessions/stream?text=she%20said") as ws:
            ws_sid = ws.receive_json()["session_id"]
            ws.send_json({"seq": 1, "text": " tha"})
            reply = ws.receive_json()
        assert reply["seq"] == 1 and reply["session_id"] == ws_sid
        assert_same_predictions(reply, predict(c, "she said tha"))


@needs_redis
def test_redis_store_serialises_updates_across_apps(model_repository: Path, redis_server: RedisServer) -> None:
    """Two apps (as two replicas would) append to one session at once: no update is lost."""
    settings = settings_for(model_repository, session_store=redis_server.url)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        sid = create(a, text="the ")["session_id"]

        async def burst(manager: Any) -> list:
            return await asyncio.gather(*(manager.update(sid, "cat ", k=ALL) for _ in range(6)))

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(c.portal.call, burst, c.app.state.sessions) for c in (a, b)]
            results = [r for f in futures for r in f.result()]
        assert sorted(r.record.committed for r in results) == list(range(2, 14))
        final = append(b, sid, "")
        assert final["committed_words"] == 13
        assert_same_predictions(final, predict(a, "the " + "cat " * 12))


@needs_redis
def test_redis_store_evicts_when_full(model_repository: Path, redis_server: RedisServer) -> None:
    settings = settings_for(model_repository, session_store=redis_server.url, max_sessions=3,
                            session_sweep_interval_seconds=0.2)
    with TestClient(create_app(settings)) as c:
        evicted = counter(metrics.SESSIONS_EVICTED, "redis")
        ids = [create(c, text="the ", ttl_seconds=10 + i)["session_id"] for i in range(4)]
        error = error_of(c.get(f"/v1/sessions/{ids[0]}"), 404, "session_expired")
        assert "evicted" in error["message"]
        assert counter(metrics.SESSIONS_EVICTED, "redis") - evicted == 1
        for sid in ids[1:]:
            assert c.get(f"/v1/sessions/{sid}").status_code == 200
        time.sleep(0.5)
        assert gauge(metrics.SESSIONS_ACTIVE, "redis") == 3


def store_errors() -> float:
    return sum(s.value for s in metrics.SESSION_STORE_ERRORS.collect()[0].samples
               if s.name.endswith("_total") and s.labels["store"] == "redis")


@needs_redis
def test_redis_outage_gives_503_and_the_service_recovers(model_repository: Path, redis_server: RedisServer) -> None:
    settings = settings_for(model_repository, session_store=redis_server.url, session_store_timeout_seconds=1)
    with TestClient(create_app(settings)) as c:
        sid = create(c, text="the ")["session_id"]
        errors = store_errors()
        redis_server.stop()
        error = error_of(c.post("/v1/sessions", json={"text": "the"}), 503, "session_store_unavailable")
        assert "redis" in error["message"]
        assert str(redis_server.port) not in error["message"] and "127.0.0.1" not in error["message"]
        error_of(c.post(f"/v1/sessions/{sid}/text", json={"text": "cat"}), 503, "session_store_unavailable")
        error_of(c.get(f"/v1/sessions/{sid}"), 503, "session_store_unavailable")
        r = c.post(f"/v1/sessions/{sid}/text", json={"text": "cat"})
        assert r.headers.get("retry-after") == "1"
        assert c.post("/v1/predict", json={"text": "the"}).status_code == 200  # stateless keeps working
        assert c.get("/readyz").status_code == 200
        with c.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            assert ws.receive_json()["error"]["type"] == "session_store_unavailable"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1013  # try again later
        assert store_errors() - errors >= 4

        redis_server.start()  # same port, empty (no persistence)
        body = create(c, text="the qu")
        assert_same_predictions(append(c, body["session_id"], "ick "), predict(c, "the quick "))
        error_of(c.get(f"/v1/sessions/{sid}"), 404, "session_not_found")  # its data went with the old server



def test_redis_stores_share_one_session_secret(redis_server: RedisServer) -> None:
    from service.sessions.redis_store import RedisStore

    async def secrets_of_two_replicas() -> tuple[bytes, bytes]:
        a, b = RedisStore(redis_server.url, 10), RedisStore(redis_server.url, 10)
        await a.start()
        await b.start()
        try:
            return await a.secret(), await b.secret()
        finally:
            await a.close()
            await b.close()

    first, second = asyncio.run(secrets_of_two_replicas())
    assert first == second and len(first) == 64


def test_a_paste_longer_than_the_context_budget_reads_its_end(model_repository: Path) -> None:
    """A session created from (or pasted) more words than NEXTWORD_CONTEXT_WORDS reads their last
    ones from a fresh state, as /v1/predict reads a long text: bounded work for the largest text
    (the whole text, read twice, outlasted the deadline), the same predictions as /v1/predict."""
    text = "the quick brown fox jumps over the lazy dog she said that they had not been there "  # 17 words
    with TestClient(create_app(settings_for(model_repository, context_words=8))) as c:
        body = create(c, text=text)
        assert (body["committed_words"], body["context_words"]) == (17, 8)
        want = c.post("/v1/predict", json={"text": text, "k": ALL}).json()
        assert want["truncated"] and want["context_words"] == 8
        got = {p["word"]: p["probability"] for p in body["predictions"]}
        assert got == pytest.approx({p["word"]: p["probability"] for p in want["predictions"]}, abs=1e-6)
        body = append(c, body["session_id"], text + "the qu")  # a long paste, ending inside a word
        assert (body["committed_words"], body["context_words"], body["pending"]) == (35, 8, "qu")
        want = c.post("/v1/predict", json={"text": text * 2 + "the qu", "k": ALL}).json()
        got = {p["word"]: p["probability"] for p in body["predictions"]}
        assert got == pytest.approx({p["word"]: p["probability"] for p in want["predictions"]}, abs=1e-6)
        body = append(c, body["session_id"], "ick ")  # typing goes on from that state: 8 words + "quick"
        assert (body["committed_words"], body["context_words"]) == (36, 9)
