"""The cache language model and new words (service/engine/cache_lm.py), its fitting and
evaluation (training/cache_fit.py, training/cache_eval.py), and the service with a fitted cache:
sessions equal stateless prediction over random chunkings with the cache and new words on,
learn=false, suggestion rotation, the session record's size, and `nextword-train fit-cache`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from nextword import artifact as A
from nextword.vocab import Vocab
from service.config import Settings
from service.engine.cache_lm import (
    AdaptedRow,
    CacheParams,
    adapt,
    cache_distribution,
    first_use_rule,
    mix,
    select_words,
)
from service.engine.vocab_index import VocabIndex
from service.main import create_app
from service.sessions import SessionRecord
from service.sessions.redis_store import RedisStore
from training.cache_eval import KsrVariant, Suggester, cache_perplexity, keystrokes, model_ksr
from training.cache_fit import CacheFitter

pytestmark = pytest.mark.timeout(300)

PARAMS = CacheParams(window=6, decay=0.9, weights=(0.1, 0.2, 0.3), kappa=0.5)


def brute_force(history: list[int], params: CacheParams, vocab_size: int) -> np.ndarray:
    """The cache's share of each word straight from the definition in cache_lm's docstring."""
    h = history[-params.history :]
    n = len(h)
    out = np.zeros(vocab_size)

    def part(positions: list[int]) -> tuple[np.ndarray, float]:
        dist = np.zeros(vocab_size)
        for m in positions:
            if n - m <= params.window:
                dist[h[m]] += params.decay ** (n - m - 1)
        return dist, float(dist.sum())

    l1, l2, l3 = params.weights
    for order, lam in ((1, l1), (2, l2), (3, l3)):
        positions = [m for m in range(order - 1, n) if h[m - order + 1 : m] == h[n - order + 1 :]] if n >= order else []
        if order == 1:
            positions = list(range(n))
        dist, total = part(positions)
        if total == 0:
            continue
        weight = lam if order == 1 else lam * total / (total + params.kappa)
        out += weight * dist / total
    return out


@given(st.lists(st.integers(0, 5), max_size=14))
def test_cache_distribution_matches_its_definition(history: list[int]) -> None:
    cache = cache_distribution(history, PARAMS)
    dense = np.zeros(6)
    dense[cache.ids] = cache.probs
    assert np.allclose(dense, brute_force(history, PARAMS, 6), atol=1e-12)
    assert math.isclose(cache.keep_out, float(dense.sum()), abs_tol=1e-12)
    row = np.log(np.full(6, 1 / 6, np.float32))
    mixed = mix(row, cache)
    assert math.isclose(float(np.exp(mixed.astype(np.float64)).sum()), 1.0, abs_tol=1e-5)


def test_new_words_need_the_minimum_count_and_stay_spelled_as_typed() -> None:
    vocab = Vocab(["<unk>", "<eos>", "the", "cat", "sat"])
    params = CacheParams(window=50, decay=1.0, weights=(0.2, 0.0, 0.0), kappa=0.0)
    words = ["the", "zorblat", "sat", "zorblat", "quux", "the"]
    ids = vocab.encode(words)
    row = np.log(np.asarray([0.3, 0.1, 0.3, 0.2, 0.1], np.float32))
    adapted = adapt(row, words, ids, params, vocab.unk_id, min_count=2)
    assert adapted.new_words == ("zorblat",)  # "quux" typed once
    # p(<unk>) mixed = 0.8 * 0.3 + 0.2 * 3/6, shared by OOV counts: zorblat 2 of 3
    assert math.isclose(math.exp(adapted.new_log_probs[0]), (0.8 * 0.3 + 0.2 * 0.5) * 2 / 3, rel_tol=1e-6)
    index = VocabIndex(vocab)
    chosen = select_words(index, adapted, 3, "z")
    assert chosen.words == ["zorblat"] and chosen.ids == [-1] and math.isclose(chosen.log_probs[0], 0.0, abs_tol=1e-9)
    assert select_words(index, adapted, 10, "").words[:1] == ["the"]
    assert "zorblat" in select_words(index, adapted, 10, "").words
    assert adapt(row, words, ids, params, vocab.unk_id, min_count=3).new_words == ()
    assert adapt(row, words, ids, None, vocab.unk_id, min_count=2).new_words == ()
    # counted whatever their case, offered as the lowercase word, kept as last written for display
    written = ["the", "zorblat", "sat", "Zorblat", "quux", "the"]
    cased = adapt(row, written, ids, params, vocab.unk_id, min_count=2)
    assert cased.new_words == ("zorblat",) and cased.new_written == ("Zorblat",)
    assert cased.written("zorblat") == "Zorblat" and cased.written("the") == "the"
    assert np.array_equal(cased.new_log_probs, adapted.new_log_probs)
    assert adapted.new_written == () and adapted.written("zorblat") == "zorblat"
    again = adapt(row, ["the", "Zorblat", "sat", "zorblat", "quux", "the"], ids, params, vocab.unk_id, min_count=2)
    assert again.new_written == () and again.written("zorblat") == "zorblat"  # last written in lowercase


def test_a_new_word_no_typo_could_explain_is_offered_after_its_first_use() -> None:
    vocab = Vocab(["<unk>", "<eos>", "the", "cat", "sat"])
    params = CacheParams(window=50, decay=1.0, weights=(0.2, 0.0, 0.0), kappa=0.0)
    words = ["the", "zorblat", "teh", "caat", "sta", "cst", "at", "x2000", "Quux"]
    ids = vocab.encode(words)
    row = np.log(np.full(5, 0.2, np.float32))
    first_use = first_use_rule(vocab)
    # one typing error from "the" (swap), "cat" (added letter), "sat" (swap), "cat" (changed
    # letter), "cat" (left out letter): slips that wait for a second use; "x2000" is not letters
    assert adapt(row, words, ids, params, vocab.unk_id, 2, first_use).new_words == ("quux", "zorblat")
    assert adapt(row, words, ids, params, vocab.unk_id, 2).new_words == ()
    assert adapt(row, words, ids, params, vocab.unk_id, 0, first_use).new_words == ()  # 0: no new words at all
    assert all(vocab.near_word(w) for w in ("teh", "caat", "sta", "cst", "at")) and not vocab.near_word("zorblat")


NEAR_VOCAB = Vocab(["<unk>", "<eos>", "the", "cat", "sat", "apple", "quick", "a"])


def one_error_apart(a: str, b: str) -> bool:
    """Damerau distance 1, straight from its definition."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                   and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


@given(st.text(alphabet="abcehilpqstuk", min_size=1, max_size=7))
def test_near_word_is_damerau_distance_one_from_a_vocabulary_word(word: str) -> None:
    if word in NEAR_VOCAB.stoi:
        return
    expected = any(one_error_apart(word, v) for v in NEAR_VOCAB.itos[2:])
    assert NEAR_VOCAB.near_word(word) is expected


def test_selection_without_a_cache_is_the_vocabulary_top_k_and_rotation_skips_words() -> None:
    vocab = Vocab(["<unk>", "<eos>", "the", "then", "they", "to", "a"])
    index = VocabIndex(vocab)
    row = np.log(np.asarray([0.1, 0.1, 0.3, 0.2, 0.15, 0.1, 0.05], np.float32))
    top = index.top_k(row, 3, "th")
    plain = select_words(index, AdaptedRow(row), 3, "th")
    assert plain.words == index.decode(top.ids) and plain.log_probs == [float(x) for x in top.log_probs]
    rotated = select_words(index, AdaptedRow(row), 2, "t", frozenset({"the"}))
    assert rotated.words == ["then", "they"]
    assert keystrokes(Suggester(index), AdaptedRow(row), "they", k=1) == 5  # t-h-e-y typed: as many as without
    # "the", "then" passed over
    assert keystrokes(Suggester(index), AdaptedRow(row), "they", k=1, rotate=True) == 3


def test_keystroke_simulation_uses_the_service_selection_and_its_settings(tmp_path: Path) -> None:
    """A blocklisted word is never offered to the simulated user (the service's selection with its
    NEXTWORD_BLOCKLIST), and with the list off it is picked like any other word."""
    vocab = Vocab(["<unk>", "<eos>", "the", "then", "they", "to", "a"])
    row = AdaptedRow(np.log(np.asarray([0.1, 0.1, 0.3, 0.2, 0.15, 0.1, 0.05], np.float32)))
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("then\n")
    listed = Suggester.for_vocab(vocab, Settings(blocklist=str(blocklist), corrections=False))
    unlisted = Suggester.for_vocab(vocab, Settings(blocklist="off", corrections=False))
    assert keystrokes(listed, row, "then", k=3) == 5 and keystrokes(unlisted, row, "then", k=3) == 1
    assert "blocklist on, typo corrections off" in listed.describe()
    assert Suggester.for_vocab(vocab, Settings(blocklist="off")).corrector is not None


def test_fitter_agrees_with_the_service_code_position_by_position() -> None:
    rng = np.random.default_rng(0)
    lengths = [40, 1, 70, 25]
    ids = rng.integers(0, 12, sum(lengths))
    log_probs = np.log(rng.uniform(0.01, 0.2, ids.size - 1))
    fitter = CacheFitter(ids, lengths, log_probs, max_window=30)
    for params in (PARAMS, CacheParams(30, 1.0, (0.05, 0.3, 0.0), 0.0), CacheParams(3, 0.5, (0.0, 0.0, 0.4), 2.0)):
        assert math.isclose(fitter.perplexity(params), cache_perplexity(ids, lengths, log_probs, params)["ppl"],
                            rel_tol=1e-9)
    params, table = fitter.fit(windows=(5, 30), decays=(1.0, 0.9), kappas=(0.5,))
    assert [row["window"] for row in table] == [5, 30]
    assert fitter.perplexity(params) == min(row["ppl"] for row in table)
    assert fitter.perplexity(params) < fitter.perplexity(None)  # a repetitive text: the cache helps


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def cached_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import _export

    root = tmp_path_factory.mktemp("cached")
    target = _export(root, "tiny", 1, "lstm", seed=5)
    card = A.read_card(target)
    card.cache = CacheParams(window=12, decay=0.95, weights=(0.15, 0.2, 0.25), kappa=0.5).to_dict()
    A.write_card(target, card)
    return root


def settings_for(repository: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model_repository=repository, device="cpu", intra_op_threads=1, reload_interval_seconds=0,
        log_level="warning", max_delta_chars=500, max_text_chars=5000, session_sweep_interval_seconds=0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def client(cached_repository: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(cached_repository))) as test_client:
        yield test_client


def predict(client: TestClient, text: str, **body: Any) -> dict:
    r = client.post("/v1/predict", json={"text": text, "k": 100, **body})
    assert r.status_code == 200, r.text
    return r.json()


def probs(body: dict) -> dict[str, float]:
    return {p["word"]: p["probability"] for p in body["predictions"]}


def assert_same(a: dict, b: dict, where: object) -> None:
    assert a["prefix"] == b["prefix"] and a["matches"] == b["matches"], where
    pa, pb = probs(a), probs(b)
    assert set(pa) == set(pb), where
    assert [p["display"] for p in a["predictions"]] == [p["display"] for p in b["predictions"]], where
    for w, p in pb.items():
        assert abs(pa[w] - p) <= 1e-5, (where, w)
    assert abs(a["prefix_probability"] - b["prefix_probability"]) <= 1e-5, where


TEXT_WORDS = ["the", "quick", "fox", "zorblat", "said", "the", "Zorblat", "fox", "quux", ".", "The", "quick", "zo"]


def test_cache_changes_predictions_and_learn_false_restores_them(client: TestClient,
                                                               cached_repository: Path) -> None:
    text = " ".join(["the quick fox said"] * 3) + " the "
    adapted, plain = predict(client, text), predict(client, text, learn=False)
    assert probs(adapted) != probs(plain)
    with TestClient(create_app(settings_for(cached_repository, adaptation=False))) as off:
        assert_same(predict(off, text), plain, "NEXTWORD_ADAPTATION=false")
    # the words just used gain probability
    assert probs(adapted)["quick"] > probs(plain).get("quick", 0.0)


def test_new_words_are_offered_after_two_uses_and_not_with_learn_false(client: TestClient,
                                                                      cached_repository: Path) -> None:
    # "quikc" may be a slip on "quick": it waits for its second use; "zorblat" is no slip on any
    # word of the vocabulary, so it is offered after its first (NEXTWORD_NEW_WORD_FIRST_USE)
    assert "quikc" not in probs(predict(client, "the quikc said the qu"))
    assert "quikc" in probs(predict(client, "the quikc said the quikc fox qu"))
    assert "zorblat" in probs(predict(client, "the zorblat said the zo"))
    with TestClient(create_app(settings_for(cached_repository, new_word_first_use=False))) as two_uses:
        assert "zorblat" not in probs(predict(two_uses, "the zorblat said the zo"))
        assert "zorblat" in probs(predict(two_uses, "the zorblat said the zorblat fox zo"))
    twice = predict(client, "the zorblat said the zorblat fox zo")
    assert list(probs(twice)) == ["zorblat"] and abs(probs(twice)["zorblat"] - 1.0) < 1e-6
    assert "zorblat" in probs(predict(client, "the zorblat said the zorblat fox "))
    assert probs(predict(client, "the zorblat said the zorblat fox zo", learn=False, corrections=False)) == {}
    # with corrections on, a fragment nothing completes is offered corrections only (never the new word)
    incognito = predict(client, "the zorblat said the zorblat fox zo", learn=False)["predictions"]
    assert incognito and all(p["correction"] and p["word"] != "zorblat" for p in incognito)


def test_new_words_are_written_as_the_writer_last_wrote_them(client: TestClient) -> None:
    def offered(body: dict) -> dict[str, str]:
        return {p["word"]: p["display"] for p in body["predictions"]}

    assert offered(predict(client, "the zorblat said the Zorblat fox zo")) == {"zorblat": "Zorblat"}
    assert offered(predict(client, "the Zorblat said the zorblat fox zo")) == {"zorblat": "zorblat"}
    assert offered(predict(client, "the zorblat said the ZORBLAT fox "))["zorblat"] == "ZORBLAT"
    sid = client.post("/v1/sessions", json={"k": 100, "text": "the zorblat said the Zorb"}).json()["session_id"]
    r = client.post(f"/v1/sessions/{sid}/text", json={"text": "lat fox z"})
    assert offered(r.json()) == {"zorblat": "Zorblat"}
    assert offered(predict(client, "the zorblat said the Zorblat fox z")) == {"zorblat": "Zorblat"}


@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 80), max_size=8))
def test_any_chunking_equals_stateless_predict_with_the_cache(client: TestClient, cuts: list[int]) -> None:
    text = " ".join(TEXT_WORDS)
    bounds = sorted({min(c, len(text)) for c in cuts}) + [len(text)]
    r = client.post("/v1/sessions", json={"k": 100})
    assert r.status_code == 201
    sid, start = r.json()["session_id"], 0
    for end in bounds:
        if end <= start:
            continue
        r = client.post(f"/v1/sessions/{sid}/text", json={"text": text[start:end]})
        assert r.status_code == 200, r.text
        assert_same(r.json(), predict(client, text[:end]), (text[:end], bounds))
        start = end


def test_session_learn_false_and_rotation(client: TestClient) -> None:
    r = client.post("/v1/sessions", json={"k": 3, "learn": False, "text": "the zorblat said the zorblat fox "})
    body = r.json()
    assert "zorblat" not in probs(body)
    assert client.get(f"/v1/sessions/{body['session_id']}").json()["learn"] is False
    plain = predict(client, "the zorblat said the zorblat fox ", k=3, learn=False)
    assert_same(body, plain, "learn false session")

    r = client.post("/v1/sessions", json={"k": 2, "rotate": True, "text": "the quick "})
    sid, offered = r.json()["session_id"], [p["word"] for p in r.json()["predictions"]]
    r = client.post(f"/v1/sessions/{sid}/text", json={"text": "t"})
    words = [p["word"] for p in r.json()["predictions"]]
    assert not set(words) & set(offered)
    assert client.get(f"/v1/sessions/{sid}").json()["rotate"] is True
    # a committed word ends the rotation; the same text without rotation shows the top words again
    r = client.post(f"/v1/sessions/{sid}/text", json={"text": "he "})
    assert_same(r.json(), predict(client, "the quick the ", k=2), "after commit")


def test_new_words_stay_in_their_session_and_an_incognito_update_is_not_learned(client: TestClient) -> None:
    def session(text: str) -> str:
        r = client.post("/v1/sessions", json={"k": 100, "text": text})
        assert r.status_code == 201, r.text
        return r.json()["session_id"]

    def type_in(sid: str, text: str, **body: Any) -> dict[str, float]:
        r = client.post(f"/v1/sessions/{sid}/text", json={"text": text, **body})
        assert r.status_code == 200, r.text
        return probs(r.json())

    writer, other = session("the zorblat said the zorblat fox "), session("the quick fox ")
    assert "zorblat" in type_in(writer, "zo")
    assert "zorblat" not in type_in(other, "zo")  # never offered outside the session that typed it
    assert "zorblat" not in probs(predict(client, "the quick fox zo"))
    # learn: false on one update: that text is neither adapted to nor remembered afterwards
    incognito = session("the quick fox ")
    assert "zorblat" not in type_in(incognito, "the zorblat said the zorblat fox ", learn=False)
    assert "zorblat" not in type_in(incognito, "zo")
    assert "zorblat" in type_in(incognito, "rblat zorblat zo")  # typed twice with learning on


def test_a_full_session_record_stays_under_64_kb() -> None:
    settings = Settings()
    words = ["extraordinarily"] * (settings.cache_window_words + 2)  # longer than most words
    record = SessionRecord(
        id="x" * 32, model="brown-lstm", version=1, created=0.0, last_used=0.0, ttl=1800.0, pending="abc",
        recent_words=words[: settings.session_rebuild_words], learned=words,
        state={"h": np.zeros((2, 400), np.float32), "c": np.zeros((2, 400), np.float32)}, last_id=3,
    )
    meta, state, _ = RedisStore.encode(record)
    assert len(meta) + len(state) <= 64 * 1024, len(meta) + len(state)


def test_a_commit_encodes_only_its_own_words_and_stays_exact(cached_repository: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A session update stays O(new words): a commit reuses the ids of the words learned so far
    (kept with the cached row) instead of encoding the whole window again, and still equals
    stateless prediction when the window is full and slides."""
    encoded: list[int] = []
    real_encode = Vocab.encode

    def counting_encode(self: Vocab, words: Any) -> list[int]:
        ids = real_encode(self, words)
        encoded.append(len(ids))
        return ids

    monkeypatch.setattr(Vocab, "encode", counting_encode)
    with TestClient(create_app(settings_for(cached_repository, cache_window_words=20))) as c:
        words = (TEXT_WORDS[:-1] * 4)[:40]
        text = " ".join(words[:10]) + " "
        sid = c.post("/v1/sessions", json={"k": 100, "text": text}).json()["session_id"]
        for word in words[10:]:
            for chunk in (word, " "):
                text += chunk
                encoded.clear()
                r = c.post(f"/v1/sessions/{sid}/text", json={"text": chunk})
                assert r.status_code == 200, r.text
                if chunk == " ":  # the commit: its tokens (a word, or "." and <eos>) for the model and the cache
                    assert sum(encoded) <= 4, (encoded, word)
                encoded.clear()
                assert_same(r.json(), predict(c, text), text)
        # the window (20) + the trigram's two context words: it slid, the cached ids with it
        assert len(c.app.state.sessions.store._sessions[sid].learned) == 22


# --------------------------------------------------------------------------- training CLI


def test_fit_cache_and_eval_cli(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from conftest import _export

    from training.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    line = "the quick brown fox said the lazy dog had the apple .\n"
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text(line * 20 + "cat sat on the mat .\n" * 10)
    target = _export(tmp_path / "models", "tiny", 1, "lstm", seed=7)
    assert main(["fit-cache", "--model", str(target), "--corpus", str(corpus), "--corpus-format", "text",
                 "--windows", "10", "50", "--no-record-command"]) == 0
    card = A.read_card(target)
    params = CacheParams.from_card(card.cache)
    assert params is not None and params.window in (10, 50)
    assert card.cache["fitted"]["ppl"] < card.cache["fitted"]["ppl_without"]
    A.verify_files(target, card)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(target), "--corpus", str(corpus), "--corpus-format", "text",
                 "--ngram-order", "2", "--ksr", "--ksr-words", "60", "--ksr-head", "25", "--json", str(out),
                 "--update-card"]) == 0
    report = json.loads(out.read_text())["adapted"]["test"]
    assert report["ppl_cache"] < report["ppl"]
    assert report["ksr"]["model+cache"]["words"] == 60
    assert report["ksr"]["model+cache"]["ksr"] > report["ksr"]["model"]["ksr"]
    assert report["ksr"]["kn2"]["words"] == 60 and report["ksr_head"]["kn2"]["words"] == 25
    assert report["ksr_head"]["model+cache"]["words"] == 25
    assert report["ksr_selection"].startswith("blocklist on, typo corrections on")  # the service defaults
    evaluation = A.read_card(target).cache["evaluation"]  # --update-card
    assert evaluation == json.loads(out.read_text())["adapted"]
    assert "command" not in A.read_card(target).cache  # --no-record-command


def test_ksr_rows_equal_one_stream(tmp_path: Path) -> None:
    """The lane-stepped rows used for KSR equal a plain one-stream read."""
    pytest.importorskip("torch")
    from conftest import TINY_WORDS, _export

    target = _export(tmp_path, "tiny", 1, "lstm", seed=9)
    rng = np.random.default_rng(1)
    docs = [list(rng.choice(TINY_WORDS, 30)), list(rng.choice(TINY_WORDS, 17))]
    one = KsrVariant("model", None)
    many = KsrVariant("model", None)
    model_ksr(target, docs, [one], lanes=1, progress=False)
    model_ksr(target, docs, [many], lanes=7, progress=False)
    assert one.count == many.count and one.count.words > 0
