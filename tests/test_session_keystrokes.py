"""Keystrokes inside a word are answered from the session's cached distribution: no onnxruntime
call, and the same answer as ``POST /v1/predict`` on the whole text (1e-5), over random typing
with backspaces and corrections (hypothesis), in memory and in a real ``redis-server`` shared by
two apps (a keystroke served by the other replica must not be answered from a stale row). Misses
recompute: eviction by the byte bound, a model version swap, a restart; the cache off runs the
model every time. The cache's byte accounting and metrics."""

from __future__ import annotations

import json
import shutil
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
from test_sessions import append, assert_same_predictions, counter, create, gauge, histogram_count, predict

from nextword.text import split_text
from service import metrics
from service.config import Settings
from service.engine.cache_lm import AdaptedRow
from service.main import create_app
from service.sessions.row_cache import ENTRY_OVERHEAD_BYTES, RowCache, entry_bytes

pytestmark = pytest.mark.timeout(300)

needs_redis = pytest.mark.skipif(REDIS_SERVER is None,
                                 reason="redis-server is not installed (apt install redis-server)")

# What a keyboard sends, one character at a time: letters of the tiny vocabulary's words (and of
# unknown ones), apostrophes and dots inside words, punctuation, spaces.
LETTERS = list("thequickbrownfoxapplyzs") + ["'", ".", ",", "(", "!", " ", " ", " "]
WORDS = ["the", "quick", "apple", "app", "thr", "don't", "u.s", "mr.", "zzz", ""]


def settings_for(repository: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model_repository=repository, device="cpu", intra_op_threads=1, reload_interval_seconds=0,
        log_level="warning", max_delta_chars=200, max_text_chars=2000, session_max_ttl_seconds=3600,
        session_sweep_interval_seconds=0, max_queue_delay_ms=0,
    )
    values.update(overrides)
    return Settings(**values)


def model_runs() -> float:
    return sum(histogram_count(metrics.INFERENCE_DURATION, model, version, "step")
               for model, version in (("tiny", "1"), ("tiny", "2"), ("tinygru", "1")))


def lookups(result: str) -> float:
    return counter(metrics.ROW_CACHE_LOOKUPS, result)


# One keystroke: ("type", character), ("back", n backspaces), ("fix", replacement fragment).
keystroke = st.one_of(
    st.tuples(st.just("type"), st.sampled_from(LETTERS)),
    st.tuples(st.just("back"), st.integers(1, 3)),
    st.tuples(st.just("fix"), st.sampled_from(WORDS)),
)


class Typist:
    """Types into one session like a keyboard and checks every answer."""

    def __init__(self, clients: list[TestClient], model: str, text: str = "", cached: bool = True) -> None:
        self.clients = clients
        self.cached = cached
        self.text = text
        self.sid = create(clients[0], model=model, text=text)["session_id"]
        self.model = model
        self.last = split_text(text)
        self.served_by = 0

    def press(self, op: tuple[str, Any], replica: int = 0) -> None:
        kind, arg = op
        pending = split_text(self.text).pending
        client = self.clients[replica]
        if kind == "type":
            self.text += arg
            body = {"text": arg}
        elif kind == "back":
            fragment = pending[: max(0, len(pending) - arg)]
            self.text = self.text[: len(self.text) - len(pending)] + fragment
            body = {"replace_pending": fragment}
        else:
            self.text = self.text[: len(self.text) - len(pending)] + arg
            body = {"replace_pending": arg}
        now = split_text(self.text)
        same_row = (not now.committed[len(self.last.committed):] and now.tail == self.last.tail
                    and replica == self.served_by)
        runs = model_runs()
        answer = append(client, self.sid, **body)
        assert_same_predictions(answer, predict(client, self.text, self.model), (self.text, op))
        assert answer["pending"] == now.pending and answer["committed_words"] == len(now.committed)
        if same_row and self.cached:  # nothing the distribution depends on changed: the cached row answered
            assert model_runs() == runs, (self.text, op)
        self.last, self.served_by = now, replica


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(model_repository))) as test_client:
        yield test_client


@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.sampled_from(["", "the ", "The quick br", "she said: \"don"]),
       keys=st.lists(keystroke, min_size=1, max_size=25), model=st.sampled_from(["tiny", "tinygru"]))
def test_keystrokes_in_memory_equal_stateless_predict(client: TestClient, start: str,
                                                     keys: list[tuple[str, Any]], model: str) -> None:
    typist = Typist([client], model, start)
    for op in keys:
        typist.press(op)


def test_typing_a_word_runs_the_model_only_when_it_commits(client: TestClient) -> None:
    typist = Typist([client], "tiny", "the ")
    hits, misses, runs = lookups("hit"), lookups("miss"), model_runs()
    for ch in "quic":
        typist.press(("type", ch))
    typist.press(("back", 2))
    typist.press(("fix", "quick"))
    assert model_runs() == runs  # six keystrokes, no model call
    assert (lookups("hit") - hits, lookups("miss") - misses) == (6, 0)
    typist.press(("type", " "))  # commits "quick": one batched call (advance + read)
    assert model_runs() == runs + 1
    typist.press(("type", "b"))
    assert model_runs() == runs + 1


def test_websocket_keystrokes_use_the_cache(client: TestClient) -> None:
    text = "the quick brown fox"
    with client.websocket_connect("/v1/sessions/stream?model=tiny&k=100") as ws:
        ws.receive_json()
        runs = model_runs()
        for seq, ch in enumerate(text, start=1):
            ws.send_json({"seq": seq, "text": ch})
            reply = ws.receive_json()
            assert reply["seq"] == seq
            assert_same_predictions(reply, predict(client, text[:seq], "tiny"), text[:seq])
    assert model_runs() - runs == text.count(" ")  # one call per committed word, none per letter


def test_fast_path_off_runs_the_model_every_time(model_repository: Path) -> None:
    with TestClient(create_app(settings_for(model_repository, session_row_cache_bytes=0))) as c:
        typist = Typist([c], "tiny", "the ", cached=False)
        hits, misses, runs = lookups("hit"), lookups("miss"), model_runs()
        for ch in "quick":
            typist.press(("type", ch))
        assert model_runs() - runs == 5
        assert (lookups("hit"), lookups("miss")) == (hits, misses)
        assert len(c.app.state.sessions.rows) == 0


def test_eviction_unloaded_version_and_restart_recompute(repository_copy: Path) -> None:
    settings = settings_for(repository_copy)
    with TestClient(create_app(settings)) as c:
        manager = c.app.state.sessions
        a = Typist([c], "tiny", "the qu")
        one = manager.rows.nbytes
        manager.rows.max_bytes = one + one // 2  # room for one session only
        evictions = counter(metrics.ROW_CACHE_EVICTIONS)
        b = Typist([c], "tiny", "she sa")  # b's row pushes a's out
        assert counter(metrics.ROW_CACHE_EVICTIONS) - evictions == 1 and len(manager.rows) == 1
        for typist in (a, b):
            runs, misses = model_runs(), lookups("miss")
            typist.cached = False
            typist.press(("type", "i"))  # its row was evicted: recomputed (and evicts the other)
            typist.cached = True
            assert (model_runs() - runs, lookups("miss") - misses) == (1, 1)
        manager.rows.max_bytes = settings.session_row_cache_bytes

        # Its version is unloaded: the session is rebuilt on tiny/1, never answered from the v2 row.
        shutil.rmtree(repository_copy / "tiny" / "2")
        assert c.post("/v1/models/reload").json()["unloaded"] == ["tiny/2"]
        body = append(c, a.sid, "c")
        assert (body["version"], body["rebuilt"]) == (1, True)
        assert_same_predictions(body, predict(c, "the quic", "tiny", 1))
        a.text, a.last, a.model = "the quic", split_text("the quic"), "tiny"
        runs = model_runs()
        body = append(c, a.sid, "k")  # the rebuilt row is cached for the new version
        assert model_runs() == runs and (body["version"], body["rebuilt"]) == (1, False)
        assert_same_predictions(body, predict(c, "the quick", "tiny", 1))
    with TestClient(create_app(settings)) as restarted:
        assert len(restarted.app.state.sessions.rows) == 0


def test_row_cache_bounds_bytes_and_checks_every_input() -> None:
    class Model:
        pass

    model, other = Model(), Model()
    row = AdaptedRow(np.linspace(-5, -1, 50, dtype=np.float32))
    state = {"h": np.ones((2, 4), np.float32)}
    size = entry_bytes(row, state)
    assert size == 50 * 4 + 2 * 4 * 4 + ENTRY_OVERHEAD_BYTES
    assert entry_bytes(AdaptedRow(row.log_probs, ("zyx",), np.zeros(1)), state) == size + 3 + 64
    before = gauge(metrics.ROW_CACHE_BYTES)
    cache = RowCache(3 * size)
    for sid in ("a", "b", "c"):
        cache.put(sid, model, (1, ()), state, row)
    assert cache.nbytes == 3 * size and gauge(metrics.ROW_CACHE_BYTES) - before == 3 * size
    assert cache.get("a", model, (1, ()), state) is not None  # "a" is now the most recent
    cache.put("d", model, (1, ()), state, row)  # evicts "b", the least recently used
    assert cache.get("b", model, (1, ()), state) is None
    assert cache.get("a", model, (1, ()), {"h": state["h"].copy()}) is not None  # equal contents
    assert cache.get("a", model, (1, ()), {"h": state["h"] * 2}) is None  # another state
    assert cache.get("a", model, (1, ()), None) is None
    assert cache.get("a", model, (2, ()), state) is None  # another stamp
    assert cache.get("a", other, (1, ()), state) is None  # another model version object
    kept = cache.get("a", model, (1, ()), state)
    assert kept is not None and not kept.log_probs.flags.writeable and np.array_equal(kept.log_probs, row.log_probs)
    cache.put("huge", model, (1, ()), None, AdaptedRow(np.zeros(10 * size, np.float32)))  # larger than the bound
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    del model
    assert cache.get("a", Model(), (1, ()), state) is None  # the version object is gone
    cache.clear()
    assert (len(cache), cache.nbytes, gauge(metrics.ROW_CACHE_BYTES)) == (0, 0, before)


# --------------------------------------------------------------------------- Redis, two replicas


@pytest.fixture(scope="module")
def redis_pair(model_repository: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, list[TestClient]]]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    settings = settings_for(model_repository, session_store=server.url)
    try:
        with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
            yield server, [a, b]
    finally:
        server.stop()


@needs_redis
@hypothesis_settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.sampled_from(["", "the ", "The quick br"]),
       keys=st.lists(st.tuples(keystroke, st.sampled_from([0, 0, 0, 1])), min_size=1, max_size=20))
def test_keystrokes_in_redis_across_replicas_equal_stateless_predict(
    redis_pair: tuple[RedisServer, list[TestClient]], start: str, keys: list[tuple[tuple[str, Any], int]]
) -> None:
    """Each keystroke goes to one of two apps sharing the Redis store: the other app's cached row
    is stale whenever a word was committed meanwhile, and must not answer."""
    typist = Typist(redis_pair[1], "tiny", start)
    for op, replica in keys:
        typist.press(op, replica)


@needs_redis
def test_redis_record_keeps_its_layout(redis_pair: tuple[RedisServer, list[TestClient]]) -> None:
    server, (a, b) = redis_pair
    sid = create(a, text="the qu")["session_id"]
    raw = server.client()
    before = raw.hgetall(f"nextword:session:{sid}")
    assert append(a, sid, "i")["pending"] == "qui"  # answered from the cache, still saved
    after = raw.hgetall(f"nextword:session:{sid}")
    assert set(after) == {b"meta", b"state", b"last_id"}
    assert (after[b"state"], after[b"last_id"]) == (before[b"state"], before[b"last_id"])
    assert set(json.loads(after[b"meta"])) == set(json.loads(before[b"meta"]))
    assert json.loads(after[b"meta"])["pending"] == "qui"
    append(b, sid, "ck ")  # the other replica commits
    body = append(a, sid, "b")  # a's row for "the" is stale: recomputed from the stored state
    assert_same_predictions(body, predict(a, "the quick b"))
    info = b.get(f"/v1/sessions/{sid}").json()
    assert (info["pending"], info["committed_words"]) == ("b", 2)


# --------------------------------------------------------------------------- the lean per-message path


def test_lean_reply_equals_the_response_model(client: TestClient) -> None:
    from service.api.routes.sessions import predictions_body, predictions_of

    manager = client.app.state.sessions
    sid = create(client, text="the qu")["session_id"]
    for delta in ["i", " ", "z"]:
        result = client.portal.call(manager.update, sid, delta)
        assert predictions_body(result) == predictions_of(result).model_dump()


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.dictionaries(
    st.sampled_from(["seq", "text", "replace_pending", "k", "learn", "filter", "corrections", "extra"]),
    st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.floats(allow_nan=False, allow_subnormal=False),
              st.text(max_size=3), st.lists(st.integers(), max_size=1)),
))
def test_hand_checked_messages_are_exactly_those_the_model_accepts(message: dict[str, Any]) -> None:
    """The hand check takes only messages StreamMessage accepts, with the same values; the rest
    go through StreamMessage for its errors."""
    from pydantic import ValidationError

    from service.api.protocol.sessions import StreamMessage
    from service.api.routes.sessions import _common_message

    fields = _common_message(message)
    if fields is None:
        return
    try:
        parsed = StreamMessage.model_validate(message)
    except ValidationError as exc:
        raise AssertionError(f"hand check accepted {message}: {exc}") from None
    assert fields == (parsed.text, parsed.replace_pending, parsed.k, parsed.learn, parsed.filter, parsed.corrections)
