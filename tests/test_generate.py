"""Generation: the engine (greedy = repeated argmax, prefix completion, seeded sampling, top-k/top-p,
beam search, stop strings, <eos>/<unk>, bounds, batching of concurrent generations, metrics) and
``POST /v1/generate`` on a real uvicorn (JSON, SSE framing, greedy = repeated /v1/predict)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from nextword.text import split_text, tokenize
from service.config import Settings
from service.engine import LoadedVersion, ModelRepository, Predictor, WorkResult
from service.engine.errors import InvalidInputError
from service.engine.generate import (
    BEAM,
    LENGTH,
    SAMPLE,
    STOP,
    CompletionResult,
    FinishEvent,
    Generation,
    GenerationParams,
    Generator,
    WordEvent,
    _Draft,
    detokenize,
    join_piece,
    plan_prompt,
)

PROMPTS = ["the quick brown ", "She said that ", "", "It was. ", "the qu", "Mr. Smith of the U.S"]


@pytest.fixture(scope="module")
def repository(model_repository: Path) -> Iterator[ModelRepository]:
    repo = ModelRepository(Settings(model_repository=model_repository, device="cpu", intra_op_threads=1,
                                    reload_interval_seconds=0, max_queue_delay_ms=2, max_generation_words=64))
    repo.scan()
    yield repo
    repo.close()


@pytest.fixture(scope="module")
def generator(repository: ModelRepository) -> Generator:
    return Generator(Predictor(repository, repository.settings))


def generate(generator: Generator, prompt: str, model: str = "tiny", version: int | None = 2,
             **params: object) -> list[CompletionResult]:
    async def go() -> list[CompletionResult]:
        generation = await generator.start(prompt, GenerationParams(**params), model, version)  # type: ignore[arg-type]
        return await generation.run()

    return asyncio.run(go())


def stream(generator: Generator, prompt: str, **params: object) -> list[WordEvent | FinishEvent]:
    async def go() -> list[WordEvent | FinishEvent]:
        generation = await generator.start(prompt, GenerationParams(**params), "tiny", 2)  # type: ignore[arg-type]
        return [event async for event in generation.events()]

    return asyncio.run(go())


def argmax_word(reference, model: str, version: int, words: list[str], prefix: str = "") -> str:
    """The greedy choice computed directly: argmax over everything but <unk> (and, completing a
    prefix, over the words starting with it)."""
    vocab = reference.vocab(model, version)
    lp = reference.log_probs(model, version, words).astype(np.float64)
    lp[vocab.unk_id] = -np.inf
    if prefix:
        lp[[i for i, w in enumerate(vocab.itos) if not w.startswith(prefix) or vocab.is_special(w)]] = -np.inf
    return vocab.itos[int(np.argmax(lp))]


# --------------------------------------------------------------------------- detokenisation


def test_detokenize_rules() -> None:
    words = ["``", "hello", ",", "world", "''", "he", "said", "(", "quietly", ")", ";", "they", "don't", "know",
             "it", "is", "n't", "5", "%", "of", "$", "10", "?", "!", "mr.", "smith", "'s", "dog", "..."]
    expected = """"hello, world" he said (quietly); they don't know it isn't 5% of $10?! mr. smith's dog..."""
    assert detokenize(words) == expected
    assert detokenize(["<eos>", "a", "<eos>", "b"]) == "a b"
    assert join_piece(None, "the") == "the"  # start of text / after whitespace
    assert join_piece("", "the") == " the"  # after prompt text that is no word
    assert join_piece("``", "the") == "the"
    assert join_piece("the", "``") == ' "'
    assert join_piece("dog", "''") == '"'


# --------------------------------------------------------------------------- greedy, prefix, bounds


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_repeated_argmax(generator: Generator, reference, prompt: str) -> None:
    (c,) = generate(generator, prompt, max_words=8)
    split = split_text(prompt)
    context = list(split.context)
    for i, w in enumerate(c.words):
        assert w.word == argmax_word(reference, "tiny", 2, context, split.prefix if i == 0 else ""), (prompt, i)
        context.append(w.word)
    if c.finish_reason == STOP:
        assert argmax_word(reference, "tiny", 2, context) == "<eos>"
    else:
        assert c.finish_reason == LENGTH and len(c.words) == 8
    assert c.text == "".join(w.text for w in c.words)
    assert "<unk>" not in [w.word for w in c.words]


def test_text_joins_the_prompt(generator: Generator) -> None:
    (fresh,) = generate(generator, "the quick brown ", max_words=4)
    assert not fresh.text.startswith(" ") and fresh.words[0].offset == 0
    (glued,) = generate(generator, "the quick brown", max_words=4)  # "brown" complete? it is a prefix too
    assert glued.words[0].word.startswith("brown")
    (after_mark,) = generate(generator, "the quick brown,", max_words=3)
    assert after_mark.text.startswith(" ") or after_mark.words[0].word in {",", ".", "''"}


def test_prefix_is_completed_first(generator: Generator, reference) -> None:
    (c,) = generate(generator, "I saw the qu", max_words=3, logprobs=4)
    first = c.words[0]
    assert first.word.startswith("qu") and first.text == first.word[2:]
    assert c.text.startswith(first.word[2:])
    expected = reference.top_words("tiny", 2, ["i", "saw", "the"], 4, "qu")
    assert first.word == expected[0][0]
    assert first.log_prob == pytest.approx(np.log(expected[0][1]), abs=1e-5)  # renormalised like predict
    assert [a.word for a in first.top] == [w for w, _ in expected]
    assert all(a.text == a.word[2:] for a in first.top)


def test_fragment_typed_in_capitals_is_completed_in_capitals(generator: Generator) -> None:
    (c,) = generate(generator, "I SAW THE QU", max_words=2)
    assert c.words[0].word.startswith("qu") and c.words[0].text == c.words[0].word[2:].upper()
    (lower,) = generate(generator, "I saw the Qu", max_words=2)
    assert lower.words[0].text == lower.words[0].word[2:]


def test_fragment_nothing_completes_is_a_word(generator: Generator, repository: ModelRepository) -> None:
    lv = repository.resolve("tiny", 2)
    plan = plan_prompt(lv, "the zebr", 100)
    assert plan.prefix == "" and plan.words == ["the", "zebr"] and plan.prev == "zebr"
    (c,) = generate(generator, "the zebr", max_words=2)
    assert not c.words or c.text.startswith(" ") or c.words[0].text == c.words[0].word


def test_bounds_are_enforced(generator: Generator) -> None:
    for params, field in [({"max_words": 65}, "max_words"), ({"n": 9}, "n"), ({"beam_width": 9}, "beam_width"),
                          ({"strategy": BEAM, "beam_width": 2, "n": 3}, "n"), ({"logprobs": 21}, "logprobs"),
                          ({"stop": ("",)}, "stop"), ({"strategy": "nucleus"}, "strategy"),
                          ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(InvalidInputError) as info:
            generate(generator, "the ", **params)
        assert info.value.field == field


def test_zero_words(generator: Generator) -> None:
    (c,) = generate(generator, "the ", max_words=0)
    assert (c.text, c.words, c.finish_reason) == ("", (), LENGTH)


# --------------------------------------------------------------------------- sampling


def test_same_seed_same_words(generator: Generator) -> None:
    a = generate(generator, "the ", strategy=SAMPLE, seed=7, n=3, max_words=10, temperature=1.5)
    b = generate(generator, "the ", strategy=SAMPLE, seed=7, n=3, max_words=10, temperature=1.5)
    c = generate(generator, "the ", strategy=SAMPLE, seed=8, n=3, max_words=10, temperature=1.5)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.text for x in a] != [x.text for x in c]
    assert len({x.text for x in a}) > 1  # completions of one request draw differently


def test_sampling_limits(generator: Generator, reference) -> None:
    (greedy,) = generate(generator, "the cat ", max_words=6)
    for limit in ({"top_k": 1}, {"top_p": 0.0}, {"temperature": 0.0}):
        (same,) = generate(generator, "the cat ", strategy=SAMPLE, seed=3, max_words=6, **limit)
        assert same.text == greedy.text, limit
    # top-k 3: every sampled word is among the 3 most likely at its step.
    for seed in range(3):
        (c,) = generate(generator, "the cat ", strategy=SAMPLE, seed=seed, top_k=3, max_words=5, temperature=5.0)
        context = ["the", "cat"]
        vocab = reference.vocab("tiny", 2)
        for w in c.words:
            lp = reference.log_probs("tiny", 2, context).astype(np.float64)
            lp[vocab.unk_id] = -np.inf
            assert vocab.stoi[w.word] in np.argsort(-lp)[:3]
            context.append(w.word)


def test_penalties_change_greedy(generator: Generator) -> None:
    (plain,) = generate(generator, "the ", max_words=12)
    (penalised,) = generate(generator, "the ", max_words=12, presence_penalty=2.0, frequency_penalty=2.0)
    distinct = len({w.word for w in penalised.words})
    assert distinct >= len({w.word for w in plain.words})
    if len({w.word for w in plain.words}) < len(plain.words):  # greedy repeats itself: the penalties must act
        assert penalised.text != plain.text


# --------------------------------------------------------------------------- beam search


def test_beam_search(generator: Generator, reference) -> None:
    (greedy,) = generate(generator, "the quick brown ", max_words=6)
    (width1,) = generate(generator, "the quick brown ", strategy=BEAM, beam_width=1, max_words=6)
    assert width1.text == greedy.text  # a beam of one is greedy search
    beams = generate(generator, "the quick brown ", strategy=BEAM, beam_width=4, n=3, max_words=6, length_penalty=0)
    assert [b.index for b in beams] == [0, 1, 2]
    assert len({b.text for b in beams}) == 3
    assert beams[0].score >= beams[1].score >= beams[2].score  # length_penalty 0: ranked by total log-prob
    # Each hypothesis carried its own state: its words' log-probs are the model's for that sequence.
    for b in beams:
        words = [w.word for w in b.words]
        expected = reference.score("tiny", 2, ["the", "quick", "brown", *words])[3:]
        np.testing.assert_allclose([w.log_prob for w in b.words], expected, atol=1e-4)


# --------------------------------------------------------------------------- stop strings, streaming


def test_stop_string_cuts_text_and_stream_agrees(generator: Generator) -> None:
    (full,) = generate(generator, "the cat ", max_words=8)
    needle = full.words[2].text.strip()[:3]
    expected = full.text[: full.text.find(needle)]
    (cut,) = generate(generator, "the cat ", max_words=8, stop=(needle,))
    assert (cut.text, cut.finish_reason) == (expected, STOP)
    assert needle not in cut.text
    events = stream(generator, "the cat ", max_words=8, stop=(needle,))
    words = [e.word for e in events if isinstance(e, WordEvent)]
    assert "".join(w.text for w in words) == cut.text
    assert isinstance(events[-1], FinishEvent) and events[-1].completion.finish_reason == STOP


def test_stream_events_match_result(generator: Generator) -> None:
    events = stream(generator, "the ", strategy=SAMPLE, seed=1, n=2, max_words=5)
    finishes = [e for e in events if isinstance(e, FinishEvent)]
    assert sorted(f.index for f in finishes) == [0, 1]
    for f in finishes:
        texts = [e.word.text for e in events if isinstance(e, WordEvent) and e.index == f.index]
        assert "".join(texts) == f.completion.text


@hypothesis_settings(max_examples=200, deadline=None)
@given(words=st.lists(st.sampled_from(["the", "cat", ",", ".", "``", "''", "don't", "n't", "(", ")", "th", "e"]),
                      max_size=12),
       stops=st.lists(st.text(alphabet="the c,.\"'()", min_size=1, max_size=4), max_size=3))
def test_stop_strings_and_streaming_property(words: list[str], stops: list[str]) -> None:
    """For any words and stop strings: the text never contains a stop string, it is the unstopped
    text cut at the first match, and the words released while streaming concatenate to it."""
    draft = _Draft(None, "")
    released: list[str] = []
    for i, word in enumerate(words):
        if draft.add(word, i, -1.0, None, stops):
            break
        released += [w.text for w in draft.releasable(stops)]
    if not draft.done:
        draft.end(LENGTH)
    released += [w.text for w in draft.releasable(stops)]
    full = detokenize(words)
    assert "".join(released) == draft.text == "".join(w.text for w in draft.words)
    assert not any(s in draft.text for s in stops)
    assert full.startswith(draft.text)
    if draft.finish_reason == STOP:
        assert any(full[len(draft.text):].startswith(s) for s in stops)


# --------------------------------------------------------------------------- <eos>, <unk> (scripted model)


class ScriptedBatcher:
    """Stands in for a batcher: <unk> always scores best; <eos> overtakes "the" from step 3 on."""

    def __init__(self, lv: LoadedVersion) -> None:
        self.lv = lv
        self.calls = 0

    def row(self) -> np.ndarray:
        row = np.full(self.lv.card.vocab_size, -20.0, dtype=np.float32)
        row[self.lv.vocab.unk_id] = -0.1
        row[self.lv.vocab.stoi["the"]] = -1.0
        row[self.lv.vocab.stoi["cat"]] = -2.0
        row[self.lv.eos_id] = -0.5 if self.calls >= 3 else -3.0
        return row

    async def run(self, item, timeout=None) -> WorkResult:
        return (await self.run_many([item]))[0]

    async def run_many(self, items, timeout=None) -> list[WorkResult]:
        self.calls += 1
        return [WorkResult(log_probs=self.row(), next_state=self.lv.zero_state()) for _ in items]


def test_eos_ends_and_unk_never_appears(repository: ModelRepository) -> None:
    real = repository.resolve("tiny", 2)
    lv = dataclasses.replace(real, batcher=ScriptedBatcher(real))

    async def go(params: GenerationParams) -> list[CompletionResult]:
        plan = plan_prompt(lv, "a ", 64)
        first = await lv.batcher.run(None)
        return await Generation(lv, plan, params, first, time.monotonic()).run()

    (c,) = asyncio.run(go(GenerationParams(max_words=10)))
    # prompt row: "the"; next row: "the"; third row: <eos> beats "the" and ends the completion.
    assert [w.word for w in c.words] == ["the", "the"] and (c.text, c.finish_reason) == ("the the", STOP)
    lv.batcher.calls = 0
    beams = asyncio.run(go(GenerationParams(max_words=10, strategy=BEAM, beam_width=2, n=2)))
    assert all("<unk>" not in [w.word for w in b.words] for b in beams)
    assert STOP in {b.finish_reason for b in beams}


# --------------------------------------------------------------------------- batching across generations


def test_concurrent_generations_share_batches(generator: Generator, repository: ModelRepository) -> None:
    lv = repository.resolve("tiny", 2)
    prompts = [f"the {w} " for w in ("cat", "dog", "fox", "queen", "apple", "mat")]
    sequential = [generate(generator, p, max_words=6)[0].text for p in prompts]
    sizes: list[int] = []
    original = lv.batcher.run_many

    async def spy(items, timeout=None):  # noqa: ANN001, ANN202
        results = await original(items, timeout)
        sizes.extend(r.batch_size for r in results)
        return results

    lv.batcher.run_many = spy  # type: ignore[method-assign]
    try:
        async def together() -> list[str]:
            async def one(p: str) -> str:
                generation = await generator.start(p, GenerationParams(max_words=6), "tiny", 2)
                return (await generation.run())[0].text

            return list(await asyncio.gather(*(one(p) for p in prompts)))

        assert asyncio.run(together()) == sequential
    finally:
        del lv.batcher.run_many
    assert max(sizes) > 1  # steps of different generations ran in one onnxruntime call


def test_generation_metrics(generator: Generator) -> None:
    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "tinygru"}) or 0.0

    before = [value("nextword_generated_words_total"), value("nextword_generation_duration_seconds_count"),
              value("nextword_generation_time_to_first_word_seconds_count")]
    (c,) = generate(generator, "the ", model="tinygru", version=None, max_words=5)
    after = [value("nextword_generated_words_total"), value("nextword_generation_duration_seconds_count"),
             value("nextword_generation_time_to_first_word_seconds_count")]
    assert after[0] - before[0] == len(c.words)
    assert after[1] - before[1] == 1
    assert after[2] - before[2] == (1 if c.words else 0)


# --------------------------------------------------------------------------- HTTP: /v1/generate


def sse_events(raw: str) -> list[tuple[str, dict]]:
    """Parse an SSE body strictly: blocks separated by a blank line, each `event:` then one `data:`."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return events


def test_http_generate_json(live_server: str) -> None:
    body = {"prompt": "the quick brown ", "max_words": 5, "model": "tiny", "logprobs": 2}
    r = httpx.post(f"{live_server}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert (data["model"], data["version"], data["prefix"], data["truncated"]) == ("tiny", 2, "", False)
    (c,) = data["completions"]
    assert c["text"] == "".join(w["text"] for w in c["words"])
    assert c["finish_reason"] in ("stop", "length") and all(len(w["top"]) == 2 for w in c["words"])
    assert data["usage"] == {"prompt_words": 3, "completion_words": len(c["words"]),
                             "total_words": 3 + len(c["words"])}


def test_http_greedy_equals_repeated_predict(live_server: str) -> None:
    """Greedy generation = take /v1/predict's top word, append it, ask again (until a sentence-end
    mark, after which the tokenizer would add an <eos> that generation does not)."""
    prompt = "the quick brown "
    with httpx.Client(base_url=live_server, timeout=60) as client:
        data = client.post("/v1/generate", json={"prompt": prompt, "max_words": 8, "model": "tinygru"}).json()
        words = [w["word"] for w in data["completions"][0]["words"]]
        text = prompt
        compared = 0
        for word in words:
            top = client.post("/v1/predict", json={"text": text, "k": 1, "model": "tinygru"}).json()
            assert top["predictions"][0]["word"] == word, (text, word)
            compared += 1
            if word in {".", "?", "!", "..."}:
                break
            text += word + " "
        assert compared >= 1 and tokenize(text)[:3] == ["the", "quick", "brown"]


def test_http_sse_framing(live_server: str) -> None:
    body = {"prompt": "the cat ", "max_words": 6, "model": "tiny", "strategy": "sample", "seed": 11, "n": 2}
    with httpx.Client(base_url=live_server, timeout=60) as client:
        plain = client.post("/v1/generate", json=body).json()
        with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            raw = "".join(r.iter_text())
    events = sse_events(raw)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"word"}
    done = events[-1][1]
    assert [c["finish_reason"] for c in done["completions"]] == [c["finish_reason"] for c in plain["completions"]]
    for c in plain["completions"]:
        streamed = [d for k, d in events if k == "word" and d["index"] == c["index"]]
        assert [d["word"] for d in streamed] == [w["word"] for w in c["words"]]
        assert "".join(d["text"] for d in streamed) == c["text"] == done["completions"][c["index"]]["text"]


def test_http_errors(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as client:
        r = client.post("/v1/generate", json={"prompt": "the ", "max_words": 100000})
        assert r.status_code == 422 and r.json()["error"]["field"] == "max_words"
        r = client.post("/v1/generate", json={"prompt": "the ", "strategy": "nucleus"})
        assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"
        r = client.post("/v1/generate", json={"prompt": "the ", "stream": True, "model": "nope"})
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["type"] == "model_not_found"
        r = client.post("/v1/generate", json={"prompt": "the ", "promt": "x"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "promt"


def test_http_generation_metrics(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as client:
        client.post("/v1/generate", json={"prompt": "the ", "max_words": 3, "model": "tiny"})
        text = client.get("/metrics").text
    for name in ("nextword_generated_words_total", "nextword_generation_duration_seconds_count",
                 "nextword_generation_time_to_first_word_seconds_count"):
        assert any(line.startswith(name + '{model="tiny"}') for line in text.splitlines()), name
