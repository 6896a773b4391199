"""Suggestions a keyboard can show: written forms (true case), the blocklist, typo corrections.

Unit tests of the pieces (casing counts, written forms, the error model, the correction index),
then the service end to end on tiny exported models: one version given casing statistics with
``nextword-train casing`` and a blocklist of frequent words, through /v1/predict, sessions (HTTP
and WebSocket), generation, OpenAI and KServe."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_WORDS, tiny_vocab
from fastapi.testclient import TestClient

from nextword import artifact as A
from nextword.artifact import version_dirs
from nextword.casing import CasingError, count_cased, read_casing, usual_form, write_casing
from nextword.vocab import Vocab
from service.config import Settings
from service.engine.blocklist import DEFAULT_BLOCKLIST, blocked_ids, read_blocklist
from service.engine.correct import ERROR_LOG_PROB, Corrector, qwerty_neighbours
from service.engine.suggest import SuggestOptions, Writing, select
from service.engine.truecase import TrueCase, starts_sentence, typed_fragment, write_as
from service.engine.vocab_index import VocabIndex
from service.main import create_app

# --- casing ---------------------------------------------------------------------------------------


def test_casing_counts_leave_out_sentence_starts() -> None:
    counts = count_cased([
        ["The", "cat", "saw", "John", "."],
        ["``", "John", "said", "the", "end", "."],
        ["Yes", ",", "I", "said", "I", "."],
    ])
    assert counts.forms["the"] == {"The": [0, 1], "the": [1, 0]}
    assert counts.forms["john"] == {"John": [1, 1]}  # after an opening quote: still initial
    assert usual_form("the", counts.forms["the"]) == "the"
    assert usual_form("john", counts.forms["john"]) == "John"
    assert usual_form("i", counts.forms["i"]) == "I"
    assert usual_form("yes", counts.forms["yes"]) == "yes"  # only ever seen starting a sentence
    assert counts.usual_forms() == {"john": "John", "i": "I"}


def test_casing_file_round_trip(tmp_path: Path) -> None:
    counts = count_cased([["A", "visit", "to", "the", "United", "States", "and", "united", "teams"]])
    lines = write_casing(tmp_path / "casing.tsv", counts, ["united", "states", "the", "teams"])
    assert lines == 3  # united (2 forms) + states; "the" and "teams" only lowercase; "a" not in the vocabulary
    again = read_casing(tmp_path / "casing.tsv")
    assert again.forms == {"united": {"United": [1, 0], "united": [1, 0]}, "states": {"States": [1, 0]}}
    (tmp_path / "bad.tsv").write_text("united\tUnited\t1\t0\n")
    with pytest.raises(CasingError):
        read_casing(tmp_path / "bad.tsv")


def test_written_forms() -> None:
    assert write_as("president", False, "Pre") == "President"
    assert write_as("use", False, "US") == "USE"  # capitals typed: capitals offered
    assert write_as("John", False, "jo") == "John"  # a name keeps its capital when typed lowercase
    assert write_as("the", True) == "The" and write_as("the", False) == "the"
    assert write_as("McDonald", True) == "McDonald" and write_as("u.s.", True) == "U.s."
    assert starts_sentence([]) and starts_sentence(["end", ".", "<eos>"]) and starts_sentence(["<eos>", "``"])
    assert not starts_sentence(["the"]) and not starts_sentence([], before=False)
    assert typed_fragment("I saw Pre", "pre") == "Pre" and typed_fragment("x", "") == ""


# --- the error model and the correction index ------------------------------------------------------


def test_error_kinds() -> None:
    corrector = Corrector(VocabIndex(Vocab([*tiny_vocab().itos, "occur", "thin"])))

    def weight(typed: str, intended: str) -> float | None:
        return corrector.variants(typed).get(intended)

    assert weight("teh", "the") == ERROR_LOG_PROB["transpose"]
    assert weight("thw", "the") == ERROR_LOG_PROB["substitute_adjacent"]  # w and e are neighbours
    assert weight("thp", "the") == ERROR_LOG_PROB["substitute"]
    assert weight("ocur", "occur") == ERROR_LOG_PROB["omit_double"] and weight("thn", "thin") == ERROR_LOG_PROB["omit"]
    assert weight("thee", "the") == ERROR_LOG_PROB["double"]
    assert weight("thre", "the") == ERROR_LOG_PROB["insert_adjacent"]
    assert weight("thqe", "the") == ERROR_LOG_PROB["insert"]
    assert "the" not in corrector.variants("the") and corrector.variants("xyz") == {}
    assert "then" not in corrector.variants("the")  # its own completions are matches, not corrections
    near = qwerty_neighbours()
    assert near["s"] == {"a", "d", "w", "e", "z", "x"} and near["p"] == {"o", "l"}


def _version(vocab: Vocab, blocked: list[str] = (), casing: dict[str, str] | None = None) -> SimpleNamespace:
    index = VocabIndex(vocab, blocked_ids(vocab, blocked))
    return SimpleNamespace(vocab=vocab, index=index, corrector=Corrector(index),
                           casing=TrueCase(vocab, casing) if casing is not None else None)


def _row(vocab: Vocab, boost: dict[str, float] | None = None) -> np.ndarray:
    logits = np.zeros(len(vocab), dtype=np.float32)
    for word, value in (boost or {}).items():
        logits[vocab.stoi[word]] = value
    return (logits - np.log(np.exp(logits).sum())).astype(np.float32)


def test_corrections_of_a_mistyped_fragment() -> None:
    vocab = tiny_vocab()
    lv = _version(vocab)
    fixes = lv.corrector.correct(lv.index.arrange(_row(vocab, {"the": 3.0})), "teh", 5)
    words = [vocab.itos[i] for i in fixes.ids]
    assert words[0] == "the" and all(w.startswith("th") for w in words)
    # A typo inside a word still being typed: "qiu" → "qui..." (transposition)
    fixes = lv.corrector.correct(lv.index.arrange(_row(vocab)), "qiu", 10)
    assert {vocab.itos[i] for i in fixes.ids} >= {"quick", "quiet", "quite"}
    # Through selection: no word starts with "teh", so corrections fill the list, marked.
    candidates, top = select(lv, _row(vocab, {"the": 3.0}), 3, "teh")
    assert top.matches == 0 and [c.word for c in candidates][0] == "the" and all(c.correction for c in candidates)
    assert abs(sum(c.probability for c in candidates) - 1) < 0.2
    assert select(lv, _row(vocab), 3, "teh", options=SuggestOptions(corrections=False))[0] == []
    # Good matches are not padded with guesses: "qu" has four completions, nothing else comes.
    candidates, _ = select(lv, _row(vocab), 10, "qu")
    assert sorted(c.word for c in candidates) == ["queen", "quick", "quiet", "quite"]
    # ... unless the matches are unlikely and a one-key slip is likely: "thw" → "the"
    candidates, _ = select(lv, _row(vocab, {"the": 8.0}), 3, "tha")
    assert candidates[0].word == "the" and candidates[0].correction
    assert not any(c.correction for c in candidates[1:] if c.word.startswith("tha"))


def test_corrections_after_every_match_was_passed_over() -> None:
    """Rotation: once every word completing the fragment was offered and passed over, the
    corrections still come, however likely those matches were (no bar from matches not shown)."""
    vocab = tiny_vocab()
    lv = _version(vocab)
    row = _row(vocab, {"the": 3.0, "quick": 6.0, "quiet": 6.0, "quite": 6.0, "queen": 6.0})
    passed = frozenset({"queen", "quick", "quiet", "quite"})
    assert sorted(c.word for c in select(lv, row, 10, "qu")[0]) == sorted(passed)
    candidates, top = select(lv, row, 3, "qu", exclude=passed)
    assert candidates and all(c.correction and c.word not in passed for c in candidates)


def test_cached_candidates_answer_like_a_fresh_corrector(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fragment's candidates are kept between requests: with the cache warm from other rows (and
    evicting, under a small bound) every answer equals a cold corrector's, filtered or not, with
    the back-off (nothing one error away, or every candidate at -inf in the row) included."""
    import service.engine.correct as correct

    vocab = Vocab([*tiny_vocab().itos, "occur", "thin"])
    blocked = blocked_ids(vocab, ["quick"])
    warm = Corrector(VocabIndex(vocab, blocked))
    monkeypatch.setattr(correct, "CANDIDATE_CACHE_BYTES", 2000)
    rng = np.random.default_rng(7)
    rows = [_row(vocab, {w: float(rng.normal(0, 3)) for w in vocab.itos}) for _ in range(4)]
    dead = rows[0].copy()
    dead[[vocab.stoi[w] for w in vocab.itos if w.startswith("th")]] = -np.inf
    rows.append(dead)
    fragments = ["teh", "qiu", "tha", "ocur", "occcur", "thw", "th", "qu", "quic", "zzz", "xq", "thinn"]
    for _ in range(2):  # the second round answers from the cache (what the bound kept)
        for row in rows:
            for fragment in fragments:
                for filtered in (True, False):
                    ranked = warm.index.arrange(row)
                    got = warm.correct(ranked, fragment, 3, filtered)
                    want = Corrector(VocabIndex(vocab, blocked)).correct(ranked, fragment, 3, filtered)
                    assert got.ids.tolist() == want.ids.tolist(), (fragment, filtered)
                    assert got.scores.tolist() == want.scores.tolist() and got.log_total == want.log_total
    assert 0 < warm._cache_bytes <= 2000 and warm._cache


def test_each_prefix_of_a_blocked_word_offers_other_words() -> None:
    shipped = version_dirs(Path(__file__).resolve().parents[1] / "models")["brown-lstm"]
    vocab = Vocab.load(shipped[max(shipped)] / "vocab.txt")
    listed = read_blocklist(DEFAULT_BLOCKLIST)
    assert listed and listed <= set(vocab.stoi), "every default entry is a word of the default vocabulary"
    lv = _version(vocab, sorted(listed))
    # The blocked words are the model's favourites here: the filter still keeps them out.
    row = _row(vocab, dict.fromkeys(listed, 12.0))
    for word in sorted(listed):
        for n in range(1, len(word)):
            for options in (SuggestOptions(), SuggestOptions(corrections=False)):
                offered = [c.word for c in select(lv, row, 5, word[:n], options=options)[0]]
                assert not set(offered) & listed, (word[:n], offered)
                if options.corrections:
                    assert offered, f"the prefix {word[:n]!r} of a blocked word offers nothing"
        unfiltered = [c.word for c in select(lv, row, 5, word[:-1], options=SuggestOptions(filter=False))[0]]
        assert word in unfiltered
    assert not set(c.word for c in select(lv, row, 50)[0]) & listed


def test_written_forms_in_selection() -> None:
    vocab = tiny_vocab()
    lv = _version(vocab, casing={"i": "I", "brown": "Brown", "u.s.": "U.S."})
    row = _row(vocab, {"brown": 4.0, "i": 3.0, "the": 2.0})
    shown = {c.word: c.display for c in select(lv, row, 5, writing=Writing(sentence_start=False))[0]}
    assert shown == {**shown, "brown": "Brown", "i": "I", "the": "the"}
    shown = {c.word: c.display for c in select(lv, row, 5, writing=Writing(sentence_start=True))[0]}
    assert shown["the"] == "The" and shown["brown"] == "Brown"
    assert [c.display for c in select(lv, row, 1, "br", Writing(False, "BR"))[0]] == ["BROWN"]
    assert [c.display for c in select(lv, row, 1, "u.", Writing(False, "u."))[0]] == ["U.S."]


def test_new_words_go_through_the_same_selection() -> None:
    """The cache language model's new words (outside the vocabulary) rank among the matches, are
    filtered by the blocklist, are never corrections, and are written as typed (no statistics)."""
    from service.engine.cache_lm import AdaptedRow

    vocab = tiny_vocab()
    lv = _version(vocab, casing={"brown": "Brown"})
    lv.index = VocabIndex(vocab, blocked_ids(vocab, ["the"]), frozenset({"the", "zorbfuck"}))
    lv.corrector = Corrector(lv.index)
    row = AdaptedRow(_row(vocab), ("zorblat", "zorbfuck"), np.log([0.2, 0.2]))
    offered = select(lv, row, 5, "zo")[0]
    assert [(c.word, c.id, c.display, c.correction) for c in offered][0] == ("zorblat", -1, "zorblat", False)
    assert "zorbfuck" not in {c.word for c in offered}
    assert "zorbfuck" in {c.word for c in select(lv, row, 5, "zo", options=SuggestOptions(filter=False))[0]}
    assert select(lv, row, 1, "zo", Writing(True, "zo"))[0][0].display == "Zorblat"
    assert select(lv, row, 1, "zo", Writing(False, "ZO"))[0][0].display == "ZORBLAT"
    assert "zorbfuck" not in {c.word for c in select(lv, row, 50)[0]}


def test_rotation_leaves_out_corrections_passed_over() -> None:
    vocab = tiny_vocab()
    lv = _version(vocab)
    row = _row(vocab, {"the": 3.0})
    first = [c.word for c in select(lv, row, 3, "teh")[0]]
    assert first[0] == "the"
    rotated = [c.word for c in select(lv, row, 3, "teh", exclude=frozenset(first))[0]]
    assert rotated and not set(rotated) & set(first)


# --- the service end to end ------------------------------------------------------------------------

BLOCKED = ["the", "then", "there", "their", "they", "quick"]
CORPUS = """Then Mr. Brown said that I had a dog.
The fox and Brown sat on the mat, and I saw it.
It was the U.S. that I saw from the dog.
"""


@pytest.fixture(scope="module")
def cased_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny repository with casing statistics added to tiny/2 by the CLI."""
    from training.cli import main

    root = tmp_path_factory.mktemp("cased")
    repository = root / "models"
    shutil.copytree(model_repository, repository)
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(CORPUS)
    assert main(["casing", "--model", str(repository / "tiny" / "2"), "--corpus", str(corpus),
                 "--corpus-format", "text"]) == 0
    (root / "blocklist.txt").write_text("# test list\n" + "\n".join(BLOCKED) + "\n")
    return repository


@pytest.fixture(scope="module")
def client(cased_repository: Path) -> Iterator[TestClient]:
    settings = Settings(model_repository=cased_repository, device="cpu", intra_op_threads=1,
                        reload_interval_seconds=0, log_level="warning",
                        blocklist=str(cased_repository.parent / "blocklist.txt"))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_casing_command_writes_a_checksummed_file(cased_repository: Path) -> None:
    version = cased_repository / "tiny" / "2"
    card = A.read_card(version)
    assert card.casing_file == A.CASING_FILE and A.CASING_FILE in card.files
    A.verify_files(version, card)
    assert read_casing(version / A.CASING_FILE).usual_forms() == {"i": "I", "brown": "Brown", "mr.": "Mr.",
                                                                   "u.s.": "U.S."}
    assert A.read_card(cased_repository / "tiny" / "1").casing_file is None


def test_casing_command_rewrites_a_lost_or_stale_casing_file(cased_repository: Path, tmp_path: Path) -> None:
    from training.cli import main

    version = tmp_path / "2"
    shutil.copytree(cased_repository / "tiny" / "2", version)
    expected = (version / A.CASING_FILE).read_bytes()
    (version / A.CASING_FILE).unlink()  # listed in model.json, but gone: counted again
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(CORPUS)
    assert main(["casing", "--model", str(version), "--corpus", str(corpus), "--corpus-format", "text"]) == 0
    assert (version / A.CASING_FILE).read_bytes() == expected
    A.verify_files(version, A.read_card(version))
    (version / "vocab.txt").write_text("changed\n")  # any other file must still be intact
    assert main(["casing", "--model", str(version), "--corpus", str(corpus), "--corpus-format", "text"]) == 2


def _predict(client: TestClient, text: str, **extra) -> list[dict]:
    r = client.post("/v1/predict", json={"text": text, "model": "tiny", "k": 100, **extra})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_predict_writes_words_as_writers_do(client: TestClient) -> None:
    shown = {p["word"]: p["display"] for p in _predict(client, "a dog and ", filter=False)}
    assert shown["i"] == "I" and shown["brown"] == "Brown" and shown["the"] == "the" and shown["u.s."] == "U.S."
    starts = {p["word"]: p["display"] for p in _predict(client, "A dog. ", filter=False)}
    assert starts["the"] == "The" and starts["brown"] == "Brown" and starts["a"] == "A"
    assert [p["display"] for p in _predict(client, "a Bro")] == ["Brown"]
    assert [p["display"] for p in _predict(client, "a BRO")] == ["BROWN"]
    assert [p["display"] for p in _predict(client, "a bro")] == ["Brown"]
    # The same text scored by both versions: probabilities do not depend on casing.
    plain = client.post("/v1/predict", json={"text": "a dog and ", "model": "tiny", "version": 2, "k": 5,
                                             "corrections": False}).json()["predictions"]
    assert [p["word"] for p in plain] == [p["word"] for p in _predict(client, "a dog and ", corrections=False)[:5]]
    # A version without casing statistics writes the model words.
    v1 = client.post("/v1/predict", json={"text": "", "model": "tiny", "version": 1, "k": 100}).json()
    assert all(p["display"] == p["word"] for p in v1["predictions"])


def test_blocked_words_are_never_offered_but_still_scored(client: TestClient) -> None:
    for text in ("", "a dog and ", "t", "th", "the", "qu", "a Th"):
        offered = {p["word"] for p in _predict(client, text)}
        assert not offered & set(BLOCKED), (text, offered)
    assert {"the", "then", "there"} <= {p["word"] for p in _predict(client, "th", filter=False)}
    for n in range(1, len("quick")):
        assert _predict(client, "quick"[:n]), "a prefix of a blocked word offers other words"
    scored = client.post("/v1/score", json={"text": "the quick fox", "model": "tiny"}).json()
    assert [w["word"] for w in scored["words"]] == ["the", "quick", "fox"]


def test_corrections_in_predict(client: TestClient) -> None:
    fixed = _predict(client, "a fox saw qiu")
    assert fixed and all(p["correction"] for p in fixed) and {p["word"] for p in fixed} >= {"quiet", "quite"}
    assert _predict(client, "a fox saw qiu", corrections=False) == []
    assert not any(p["correction"] for p in _predict(client, "a fox saw qu"))


def test_corrections_cost_no_model_work(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A correction reuses the keystroke's row: a request with corrections submits the same one row
    as without, and a session keystroke inside a word (answered from its cached row) none."""
    lv = client.app.state.engine.repository.resolve("tiny", None)
    rows: list[int] = []
    run_many = lv.batcher.run_many

    async def counting(items, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows.append(len(items))
        return await run_many(items, *args, **kwargs)

    monkeypatch.setattr(lv.batcher, "run_many", counting)
    assert all(p["correction"] for p in _predict(client, "a fox saw qiu"))
    _predict(client, "a fox saw qiu", corrections=False)
    assert rows == [1, 1]
    sid = client.post("/v1/sessions", json={"model": "tiny", "text": "a fox saw "}).json()["session_id"]
    rows.clear()
    body = client.post(f"/v1/sessions/{sid}/text", json={"text": "qiu"}).json()
    assert body["predictions"] and all(p["correction"] for p in body["predictions"])
    assert rows == []


def test_corrections_setting_off(cased_repository: Path) -> None:
    settings = Settings(model_repository=cased_repository, device="cpu", intra_op_threads=1,
                        reload_interval_seconds=0, log_level="warning", corrections=False, blocklist="off")
    with TestClient(create_app(settings)) as c:
        body = c.post("/v1/predict", json={"text": "a fox saw qiu", "model": "tiny"}).json()
        assert body["predictions"] == []
        words = {p["word"] for p in c.post("/v1/predict", json={"text": "th", "model": "tiny", "k": 100}).json()[
            "predictions"]}
        assert "the" in words  # blocklist off


def test_sessions_http_and_websocket(client: TestClient) -> None:
    r = client.post("/v1/sessions", json={"model": "tiny", "text": "A dog. ", "k": 100})
    assert r.status_code == 201, r.text
    body = r.json()
    sid = body["session_id"]
    shown = {p["word"]: p["display"] for p in body["predictions"]}
    assert shown["a"] == "A" and "the" not in shown
    body = client.post(f"/v1/sessions/{sid}/text", json={"text": "and Bro"}).json()
    assert [p["display"] for p in body["predictions"]] == ["Brown"]
    body = client.post(f"/v1/sessions/{sid}/text", json={"replace_pending": "th", "filter": False}).json()
    assert "the" in {p["word"] for p in body["predictions"]}
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["filter"] is True and info["corrections"] is True
    with client.websocket_connect("/v1/sessions/stream?model=tiny&k=10&corrections=false") as ws:
        first = ws.receive_json()
        assert first["corrections"] is False
        ws.send_json({"seq": 1, "text": "a fox saw qiu"})
        assert ws.receive_json()["predictions"] == []
        ws.send_json({"seq": 2, "replace_pending": "qiu", "corrections": True})
        reply = ws.receive_json()
        assert reply["seq"] == 2 and reply["predictions"] and all(p["correction"] for p in reply["predictions"])
        ws.send_json({"seq": 3, "replace_pending": "I"})
        reply = ws.receive_json()
        assert {p["word"]: p["display"] for p in reply["predictions"]}["i"] == "I"
        assert all(p["display"][0] == "I" for p in reply["predictions"])


def _generated_words(client: TestClient, path: str, body: dict) -> list[str]:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    if path == "/v1/generate":
        return [w["word"] for c in r.json()["completions"] for w in c["words"]]
    return [t.strip().lower() for c in r.json()["choices"] for t in c["logprobs"]["tokens"]]


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_generation_never_emits_a_blocked_word(client: TestClient, strategy: str) -> None:
    body = {"prompt": "a dog and", "model": "tiny", "max_words": 30, "strategy": strategy, "n": 4, "seed": 1,
            "temperature": 1.5, "beam_width": 4, "logprobs": 5}
    words = _generated_words(client, "/v1/generate", body)
    assert words and not set(words) & set(BLOCKED)
    r = client.post("/v1/generate", json=body).json()
    alternatives = {a["word"] for c in r["completions"] for w in c["words"] for a in w["top"]}
    assert not alternatives & set(BLOCKED)
    if strategy == "sample":
        unfiltered = _generated_words(client, "/v1/generate", {**body, "filter": False, "n": 8, "max_words": 60})
        assert set(unfiltered) & set(BLOCKED), "the test would pass without a filter"


def test_generation_writes_usual_forms(client: TestClient) -> None:
    r = client.post("/v1/generate", json={"prompt": "a Bro", "model": "tiny", "max_words": 1}).json()
    assert r["completions"][0]["text"] == "wn" and r["completions"][0]["words"][0]["word"] == "brown"
    r = client.post("/v1/generate", json={"prompt": "a dog and", "model": "tiny", "max_words": 30, "strategy": "sample",
                                          "seed": 3, "n": 8}).json()
    for c in r["completions"]:
        for w in c["words"]:
            if w["word"] in ("i", "brown"):
                assert w["text"].strip() in ("I", "Brown")


def test_openai_filter(client: TestClient) -> None:
    body = {"model": "tiny", "prompt": "a dog and", "max_tokens": 30, "n": 4, "seed": 2, "logprobs": 1}
    words = _generated_words(client, "/openai/v1/completions", body)
    assert words and not set(words) & set(BLOCKED)
    r = client.post("/openai/v1/completions", json={**body, "filter": False})
    assert r.status_code == 200


def test_kserve_outputs_and_parameters(client: TestClient) -> None:
    request = {"parameters": {"k": 3},
               "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a Bro", "a fox saw qiu"]}],
               "outputs": [{"name": "words"}, {"name": "display"}, {"name": "correction"}]}
    r = client.post("/v2/models/tiny/infer", json=request)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert outs["display"]["data"][:3] == ["Brown", "", ""] and outs["words"]["data"][0] == "brown"
    assert outs["correction"]["datatype"] == "BOOL" and outs["correction"]["data"][:4] == [False, False, False, True]
    request["parameters"] = {"k": 3, "corrections": False, "filter": False}
    outs = {o["name"]: o for o in client.post("/v2/models/tiny/infer", json=request).json()["outputs"]}
    assert outs["words"]["data"][3:] == ["", "", ""]
    request["parameters"] = {"filter": "no"}
    r = client.post("/v2/models/tiny/infer", json=request)
    assert r.status_code == 400 and "filter" in r.json()["error"]


def test_bad_blocklist_setting_fails_start(cased_repository: Path, tmp_path: Path) -> None:
    settings = Settings(model_repository=cased_repository, device="cpu", blocklist=str(tmp_path / "missing.txt"),
                        reload_interval_seconds=0, log_level="warning")
    with pytest.raises(Exception, match="blocklist"), TestClient(create_app(settings)):
        pass


def test_openapi_describes_the_new_fields(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"display", "correction"} <= set(schemas["WordProbability"]["properties"])
    assert {"filter", "corrections"} <= set(schemas["PredictRequest"]["properties"])
    assert {"filter", "corrections"} <= set(schemas["SessionUpdateRequest"]["properties"])
    assert "filter" in schemas["GenerateRequest"]["properties"]
    assert json.dumps(schemas["WordProbability"]).count("usual form") >= 1
    assert set(TINY_WORDS) >= set(BLOCKED)
