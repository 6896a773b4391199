"""The engine without HTTP: vocabulary index, dynamic batcher (generic work items with state),
predictor and scoring, each checked against onnxruntime run directly one row at a time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nextword import artifact as A
from nextword.text import split_text
from service.engine import (
    PREDICT,
    SCORE,
    STEP,
    Batcher,
    LoadedVersion,
    ModelRepository,
    Predictor,
    SuggestOptions,
    VocabIndex,
    WorkItem,
    select,
)
from service.engine.errors import BatcherClosedError, DeadlineExceededError, QueueFullError


@pytest.fixture(scope="module")
def repository(model_repository: Path) -> ModelRepository:
    from service.config import Settings

    repo = ModelRepository(Settings(model_repository=model_repository, device="cpu", intra_op_threads=1,
                                    reload_interval_seconds=0, max_queue_delay_ms=1))
    repo.scan()
    yield repo
    repo.close()


@pytest.fixture(scope="module")
def tiny(repository: ModelRepository) -> LoadedVersion:
    return repository.resolve("tiny", 2)


def make_batcher(lv: LoadedVersion, **kwargs) -> Batcher:
    options = {"max_batch_size": 64, "max_queue_delay": 0.001, "queue_capacity": 1024, "timeout": 10.0}
    options.update(kwargs)
    return Batcher(lv.runtime, model=lv.name, version=lv.version, **options).start()


def direct(lv: LoadedVersion, graph: str, tokens: np.ndarray, state: dict[str, np.ndarray] | None = None,
           targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One unpadded row through onnxruntime directly."""
    sess = lv.runtime.sessions[graph]
    feeds = {A.TOKENS: tokens[None].astype(np.int64), A.LENGTHS: np.array([tokens.size], np.int64)}
    for name in lv.card.state_names:
        row = state[name] if state is not None else np.zeros((lv.card.num_layers, lv.card.hidden_size), np.float32)
        feeds[A.state_input(name)] = row[:, None, :].astype(np.float32)
    if targets is not None:
        feeds[A.TARGETS] = targets[None].astype(np.int64)
    names = [o.name for o in sess.get_outputs()]
    return {n: v[0] if n in (A.LOG_PROBS, A.TARGET_LOG_PROBS, A.TARGET_RANKS) else v[:, 0]
            for n, v in zip(names, sess.run(names, feeds), strict=True)}


# --------------------------------------------------------------------------- vocabulary index


def test_prefix_ranges_match_brute_force(tiny: LoadedVersion) -> None:
    index = tiny.index
    words = tiny.vocab.itos
    for prefix in ["", "t", "th", "the", "thes", "app", "apply", "qu", "u", "u.", "mr", "1", "z", "zzz", "<", "é"]:
        expected = sorted(i for i, w in enumerate(words) if w.startswith(prefix) and not tiny.vocab.is_special(w))
        assert sorted(index.candidates(prefix).tolist()) == expected, prefix


def test_top_k_matches_brute_force() -> None:
    from nextword.vocab import Vocab

    rng = np.random.default_rng(0)
    vocab = Vocab(["<unk>", "<eos>", *(f"w{i:03d}" for i in range(300)), "apple", "apply", "app"])
    index = VocabIndex(vocab)
    for trial in range(20):
        lp = rng.normal(size=len(vocab)).astype(np.float32)
        lp[:2] = 10.0  # specials are the most likely: still never offered
        lp -= np.log(np.exp(lp.astype(np.float64)).sum())
        prefix = ["", "w1", "w00", "app", "x"][trial % 5]
        k = [1, 3, 10, 500][trial % 4]
        top = index.top_k(lp, k, prefix)
        eligible = [i for i, w in enumerate(vocab.itos) if i > 1 and w.startswith(prefix)]
        best = sorted(eligible, key=lambda i: (-lp[i], i))[:k]
        assert top.ids.tolist() == best
        mass = float(np.exp(lp[eligible].astype(np.float64)).sum()) if eligible else 0.0
        assert top.mass == pytest.approx(mass, rel=1e-6)
        expected = lp[best].astype(np.float64) - (np.log(mass) if prefix and eligible else 0.0)
        np.testing.assert_allclose(top.log_probs, expected, atol=1e-6)
        if prefix and eligible and k >= len(eligible):
            assert np.exp(top.log_probs).sum() == pytest.approx(1.0)


def test_top_k_shortlist_is_exact_on_a_large_vocabulary() -> None:
    """Vocabulary-sized rows take the block-maxima shortlist; coarse rounding makes many ties."""
    from nextword.vocab import Vocab

    rng = np.random.default_rng(1)
    vocab = Vocab(["<unk>", "<eos>", *(f"w{i:05d}" for i in range(20000))])
    index = VocabIndex(vocab)
    for trial in range(12):
        lp = np.round(rng.normal(size=len(vocab)), 1).astype(np.float32)
        lp[:2] = lp.max() + 1.0
        if trial % 3 == 2:
            lp[100:20002] = -np.inf  # fewer finite words than k
        lp.flags.writeable = False
        prefix = ["", "w1", "w000"][trial % 3]
        k = [1, 5, 37, 100][trial % 4]
        top = index.top_k(lp, k, prefix)
        eligible = [i for i, w in enumerate(vocab.itos) if i > 1 and w.startswith(prefix)]
        assert top.ids.tolist() == sorted(eligible, key=lambda i: (-lp[i], i))[:k]


def test_ties_are_ordered_by_id() -> None:
    from nextword.vocab import Vocab

    index = VocabIndex(Vocab(["<unk>", "<eos>", "b", "a", "c", "d"]))
    top = index.top_k(np.log(np.full(6, 1 / 6, np.float32)), 3)
    assert top.ids.tolist() == [2, 3, 4]


# --------------------------------------------------------------------------- batcher


def test_work_items_with_state_match_direct_runs(tiny: LoadedVersion) -> None:
    """The generic contract sessions build on: initial state rows in, next state rows out."""
    rng = np.random.default_rng(1)
    batcher = make_batcher(tiny, max_queue_delay=0.05)
    try:
        shape = (tiny.card.num_layers, tiny.card.hidden_size)
        items = []
        for n in [1, 5, 2, 9, 3, 1, 7]:
            state = None if n % 3 == 0 else {s: rng.normal(0, 0.5, shape).astype(np.float32)
                                             for s in tiny.card.state_names}
            items.append(WorkItem(rng.integers(0, tiny.card.vocab_size, n), PREDICT, state=state, want_state=True,
                                  label=STEP))
        futures = batcher.submit_many(items)
        results = [f.result(timeout=10) for f in futures]
        assert max(r.batch_size for r in results) > 1
        for item, result in zip(items, results, strict=True):
            ref = direct(tiny, "predict", item.tokens, item.state)
            np.testing.assert_allclose(result.log_probs, ref[A.LOG_PROBS], atol=1e-5)
            for name in tiny.card.state_names:
                assert result.next_state[name].shape == shape
                np.testing.assert_allclose(result.next_state[name], ref[A.state_output(name)], atol=1e-5)
    finally:
        batcher.close()


def test_stepping_through_state_equals_feeding_at_once(tiny: LoadedVersion) -> None:
    """What a session does: commit words through the state, then predict from it."""
    words = ["the", "quick", "brown", "fox", "jumps"]
    ids = np.array([tiny.eos_id, *tiny.vocab.encode(words)])

    async def go() -> tuple[np.ndarray, np.ndarray]:
        whole = await tiny.batcher.run(WorkItem(ids))
        state = None
        for chunk in (ids[:2], ids[2:3], ids[3:]):
            out = await tiny.batcher.run(WorkItem(chunk, state=state, want_state=True, label=STEP))
            state = out.next_state
        return whole.log_probs, out.log_probs

    whole, stepped = asyncio.run(go())
    np.testing.assert_allclose(stepped, whole, atol=1e-5)


def test_batching_on_and_off_give_identical_results(tiny: LoadedVersion) -> None:
    rng = np.random.default_rng(2)
    items = [rng.integers(0, tiny.card.vocab_size, int(n)) for n in rng.integers(1, 30, 48)]
    on = make_batcher(tiny, max_batch_size=64, max_queue_delay=0.02)
    off = make_batcher(tiny, max_batch_size=1, max_queue_delay=0.0)

    async def run(batcher: Batcher) -> list:
        return await asyncio.gather(*(batcher.run(WorkItem(t)) for t in items))

    try:
        batched = asyncio.run(run(on))
        single = asyncio.run(run(off))
    finally:
        on.close()
        off.close()
    assert max(r.batch_size for r in batched) > 1
    assert all(r.batch_size == 1 for r in single)
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-6, rtol=0)
        best = np.argsort(-a.log_probs, kind="stable")[:5]
        assert best.tolist() == np.argsort(-b.log_probs, kind="stable")[:5].tolist()


def test_two_workers_share_the_queue_and_the_cores(tiny: LoadedVersion) -> None:
    """Overlapping batches run on the narrower sessions, a lone one on the full pool; every row
    still equals the direct one-row run."""
    from service.engine.runtime import ModelRuntime, choose_device

    runtime = ModelRuntime.load(tiny.path, tiny.card, choose_device("cpu"), intra_op_threads=2, workers=2)
    assert runtime.shared_sessions is not None
    assert runtime.shared_sessions["predict"].get_session_options().intra_op_num_threads == 1
    used: list[bool] = []
    workers: list[str] = []
    run = runtime.run

    # The burst's first batch waits (at most 10 s) until the other worker has a batch too, so the
    # overlap this test is about does not depend on how a busy machine schedules the two threads.
    overlapped = threading.Event()

    def spy(graph, feeds, outputs, shared=False):
        used.append(shared)
        workers.append(threading.current_thread().name)
        if len(set(workers)) > 1:
            overlapped.set()
        elif len(workers) == 1 and not overlapped.is_set():
            overlapped.wait(timeout=10)
        return run(graph, feeds, outputs, shared)

    runtime.run = spy  # type: ignore[method-assign]
    batcher = Batcher(runtime, model=tiny.name, version=tiny.version, max_batch_size=4, max_queue_delay=0.0,
                      workers=2).start()
    rng = np.random.default_rng(5)
    items = [rng.integers(0, tiny.card.vocab_size, int(n)) for n in rng.integers(1, 30, 64)]

    async def burst() -> list:
        return await asyncio.gather(*(batcher.run(WorkItem(t)) for t in items))

    try:
        results = asyncio.run(burst())
        assert len(set(workers)) == 2  # the burst kept both workers busy
        overlapped.set()  # the lone runs below are not held
        workers.clear()
        for _ in range(5):
            # Lone: worker 0 hands out results before it marks itself idle, so wait for that too.
            deadline = time.monotonic() + 10
            while any(batcher._busy) and time.monotonic() < deadline:
                time.sleep(0.001)
            lone = batcher.submit(WorkItem(items[0])).result(timeout=10)
    finally:
        batcher.close()
    assert len(batcher._threads) == 2 and not any(t.is_alive() for t in batcher._threads)
    assert True in used and used[-1] is False  # a lone item runs on the full pool...
    assert all(name.endswith("-0") for name in workers)  # ...and always on worker 0
    for tokens, result in zip([*items, items[0]], [*results, lone], strict=True):
        np.testing.assert_allclose(result.log_probs, direct(tiny, PREDICT, tokens)[A.LOG_PROBS], atol=1e-5, rtol=0)


def test_predict_and_score_items_share_a_queue(tiny: LoadedVersion) -> None:
    rng = np.random.default_rng(3)
    batcher = make_batcher(tiny, max_queue_delay=0.02)
    try:
        items = []
        for i in range(12):
            tokens = rng.integers(0, tiny.card.vocab_size, 1 + i % 5)
            if i % 2:
                items.append(WorkItem(tokens, SCORE, targets=rng.integers(0, tiny.card.vocab_size, tokens.size)))
            else:
                items.append(WorkItem(tokens, PREDICT))
        results = [f.result(timeout=10) for f in batcher.submit_many(items)]
        for item, result in zip(items, results, strict=True):
            ref = direct(tiny, item.graph, item.tokens, targets=item.targets)
            if item.graph == SCORE:
                np.testing.assert_allclose(result.target_log_probs, ref[A.TARGET_LOG_PROBS], atol=1e-5)
                assert result.target_ranks.tolist() == ref[A.TARGET_RANKS].tolist()
                assert result.log_probs is None
            else:
                np.testing.assert_allclose(result.log_probs, ref[A.LOG_PROBS], atol=1e-5)
                assert result.next_state is None
    finally:
        batcher.close()


def test_token_budget_splits_batches(tiny: LoadedVersion) -> None:
    batcher = make_batcher(tiny, max_queue_delay=0.05, max_batch_tokens=40)
    try:
        items = [WorkItem(np.ones(30, np.int64))] + [WorkItem(np.ones(2, np.int64)) for _ in range(10)]
        results = [f.result(timeout=10) for f in batcher.submit_many(items)]
        assert results[0].batch_size == 1  # 30 tokens: a second row would pad to 60 > 40
        assert all(r.batch_size * 2 <= 40 for r in results[1:])
    finally:
        batcher.close()


def test_malformed_items_are_rejected(tiny: LoadedVersion) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        tiny.batcher.submit(WorkItem(np.array([], np.int64)))
    with pytest.raises(ValueError, match="state"):
        tiny.batcher.submit(WorkItem(np.array([1]), state={"h": np.zeros((1, 1), np.float32)}))
    with pytest.raises(ValueError, match="targets"):
        tiny.batcher.submit(WorkItem(np.array([1, 2]), SCORE, targets=np.array([1])))


def test_queue_full_then_close_fails_waiting_items(tiny: LoadedVersion) -> None:
    batcher = make_batcher(tiny, queue_capacity=2, max_queue_delay=5.0, max_batch_size=64)
    try:
        futures = batcher.submit_many([WorkItem(np.array([1])), WorkItem(np.array([1, 2]))])
        with pytest.raises(QueueFullError):
            batcher.submit(WorkItem(np.array([1])))
        with pytest.raises(QueueFullError):  # all-or-nothing
            batcher.submit_many([WorkItem(np.array([1]))] * 1)
    finally:
        batcher.close(drain=False)
    for f in futures:
        with pytest.raises(BatcherClosedError):
            f.result(timeout=5)
    with pytest.raises(BatcherClosedError):
        batcher.submit(WorkItem(np.array([1])))


def test_close_with_drain_runs_queued_items(tiny: LoadedVersion) -> None:
    batcher = make_batcher(tiny, max_queue_delay=5.0)
    futures = batcher.submit_many([WorkItem(np.array([1, 2, 3])) for _ in range(5)])
    start = time.monotonic()
    batcher.close(drain=True, timeout=5)
    assert time.monotonic() - start < 2.0  # closing does not wait out the queue delay
    assert all(f.result(timeout=1).log_probs is not None for f in futures)


def test_deadline_exceeded_while_queued(tiny: LoadedVersion) -> None:
    batcher = make_batcher(tiny, max_queue_delay=0.3)
    try:
        with pytest.raises(DeadlineExceededError):
            asyncio.run(batcher.run(WorkItem(np.array([1])), timeout=0.05))
        # The worker fails expired items itself too (thread API: nobody awaits with a timeout).
        future = batcher.submit(WorkItem(np.array([1])), timeout=0.01)
        with pytest.raises(DeadlineExceededError):
            future.result(timeout=5)
    finally:
        batcher.close()


def test_cancelled_items_are_skipped(tiny: LoadedVersion) -> None:
    batcher = make_batcher(tiny, max_queue_delay=0.2)
    try:
        first, second = batcher.submit_many([WorkItem(np.array([1])), WorkItem(np.array([2]))])
        assert first.cancel()
        assert second.result(timeout=5).batch_size == 1
        assert batcher.depth == 0
    finally:
        batcher.close()


def test_worker_submissions_from_many_threads(tiny: LoadedVersion) -> None:
    batcher = make_batcher(tiny, max_queue_delay=0.005)
    errors: list[BaseException] = []
    results: list[concurrent.futures.Future] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(10):
                f = batcher.submit(WorkItem(rng.integers(0, tiny.card.vocab_size, 4)))
                with lock:
                    results.append(f)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert all(f.result(timeout=10).log_probs.shape == (tiny.card.vocab_size,) for f in results)
    finally:
        batcher.close()


# --------------------------------------------------------------------------- predictor


@pytest.fixture(scope="module")
def predictor(repository: ModelRepository) -> Predictor:
    return Predictor(repository, repository.settings)


@pytest.mark.parametrize("text", ["", "The quick brown ", "the qu", "He said: \"apple", "Mr. Smith went to the U.S",
                                  "unknownword and ", "th", "It was. ", "x"])
def test_predictions_equal_direct_onnxruntime(predictor: Predictor, reference, text: str) -> None:
    split = split_text(text)
    # The model's own ranking: typo corrections (tested in test_suggestions.py) would add words.
    got = asyncio.run(predictor.predict(text, k=5, options=SuggestOptions(corrections=False)))
    assert (got.model, got.version) == ("tiny", 2)
    assert got.prefix == split.prefix
    expected = reference.top_words("tiny", 2, split.context, 5, split.prefix)
    assert [c.word for c in got.candidates] == [w for w, _ in expected]
    np.testing.assert_allclose([c.probability for c in got.candidates], [p for _, p in expected], rtol=1e-5)
    assert all(c.word.startswith(split.prefix) for c in got.candidates)
    assert not {"<unk>", "<eos>"} & {c.word for c in got.candidates}


def test_prefix_probabilities_renormalised(predictor: Predictor) -> None:
    got = asyncio.run(predictor.predict("I like the app", k=100))
    assert got.prefix == "app" and got.matches == 4
    assert [c.word for c in got.candidates] and all(c.word.startswith("app") for c in got.candidates)
    assert sum(c.probability for c in got.candidates) == pytest.approx(1.0, abs=1e-6)
    assert 0 < got.prefix_probability < 1


def test_prefix_without_matches_is_empty(predictor: Predictor) -> None:
    got = asyncio.run(predictor.predict("the zebr"))
    assert got.prefix == "zebr" and got.candidates == [] and got.matches == 0


def test_context_budget_truncates(repository: ModelRepository, reference) -> None:
    from service.config import Settings

    budget = Predictor(repository, Settings(model_repository=repository.root, context_words=3))
    text = "the cat sat on the mat and the dog "
    got = asyncio.run(budget.predict(text, k=5, model="tiny", version=1))
    assert got.truncated and got.context_words == 3
    expected = reference.top_words("tiny", 1, ["and", "the", "dog"], 5)
    assert [c.word for c in got.candidates] == [w for w, _ in expected]
    short = asyncio.run(budget.predict("the cat ", model="tiny", version=1))
    assert not short.truncated and short.context_words == 2


def test_predict_many_mixes_models(predictor: Predictor, reference) -> None:
    from service.engine import PredictQuery

    queries = [PredictQuery("the ", 3), PredictQuery("the ", 3, "tinygru"), PredictQuery("a qu", 2, "tiny", 1)]
    got = asyncio.run(predictor.predict_many(queries))
    assert [(p.model, p.version) for p in got] == [("tiny", 2), ("tinygru", 1), ("tiny", 1)]
    assert [c.word for c in got[1].candidates] == [w for w, _ in reference.top_words("tinygru", 1, ["the"], 3)]


def test_score_equals_direct_onnxruntime(predictor: Predictor, reference) -> None:
    text = "The cat sat on the zebra. It was"
    got = asyncio.run(predictor.score(text))
    words = [w.word for w in got.words]
    assert words == ["the", "cat", "sat", "on", "the", "zebra", ".", "<eos>", "it", "was"]
    assert [w.oov for w in got.words] == [w == "zebra" for w in words]
    expected = reference.score("tiny", 2, words)
    np.testing.assert_allclose([w.log_prob for w in got.words], expected, atol=1e-5)
    assert got.perplexity == pytest.approx(float(np.exp(-expected.astype(np.float64).mean())), rel=1e-5)


def test_select_is_the_public_top_k(tiny: LoadedVersion, reference) -> None:
    lp = reference.log_probs("tiny", 2, ["the"])
    candidates, top = select(tiny, lp, 3, "th")
    assert [c.word for c in candidates] == [w for w, _ in reference.top_words("tiny", 2, ["the"], 3, "th")]
    assert top.matches == sum(w.startswith("th") for w in tiny.vocab.itos)


def test_long_score_runs_in_state_carrying_chunks(model_repository: Path, reference) -> None:
    """A text longer than the score chunk is scored chunk by chunk, each starting from the state the
    previous one ended in: the same numbers as one unchunked pass, with no score batch wider than
    the chunk (the graph's [time, vocabulary] intermediates are what exhausted memory)."""
    from service.config import Settings

    settings = Settings(model_repository=model_repository, device="cpu", intra_op_threads=1,
                        reload_interval_seconds=0, score_chunk_tokens=7)
    repo = ModelRepository(settings)
    repo.scan()
    try:
        lv = repo.resolve("tiny", 2)
        widths: list[int] = []
        real = lv.runtime.run

        def spy(graph, feeds, outputs, shared=False):
            if graph == "score":
                widths.append(int(feeds[A.TOKENS].size))
            return real(graph, feeds, outputs, shared)

        lv.runtime.run = spy
        text = "the cat sat on the mat . the dog jumps over the lazy fox and the queen said that it was quick "
        got = asyncio.run(Predictor(repo, settings).score(text, "tiny", 2))
        words = [w.word for w in got.words]
        assert len(words) > 3 * 7
        np.testing.assert_allclose([w.log_prob for w in got.words], reference.score("tiny", 2, words), atol=1e-5)
        assert len(widths) == -(-len(words) // 7) and max(widths) <= 7
    finally:
        repo.close()


def test_score_word_limit(repository: ModelRepository) -> None:
    from service.config import Settings
    from service.engine.errors import TextTooLongError

    limited = Predictor(repository, Settings(model_repository=repository.root, max_score_words=5))
    asyncio.run(limited.score("a b c d e", "tiny", 2))
    with pytest.raises(TextTooLongError, match="6 words.*NEXTWORD_MAX_SCORE_WORDS"):
        asyncio.run(limited.score("a b c d e f", "tiny", 2))


def test_score_batches_respect_their_token_budget(tiny: LoadedVersion) -> None:
    batcher = make_batcher(tiny, max_score_tokens=8, max_queue_delay=0.05)
    try:
        items = [WorkItem(np.arange(2, 6), SCORE, targets=np.arange(3, 7)) for _ in range(5)]
        results = [f.result(10) for f in batcher.submit_many(items)]
        assert max(r.batch_size for r in results) == 2  # 2 rows x 4 tokens fill the budget of 8
    finally:
        batcher.close()


def test_work_on_a_version_unloaded_in_between_is_resubmitted_to_its_successor() -> None:
    from service.engine.swap import SWAP_ATTEMPTS, on_current_version

    resolved: list[int] = []

    def resolve() -> int:
        resolved.append(len(resolved) + 1)
        return resolved[-1]

    async def closed_until(good: int, version: int) -> str:
        if version < good:
            raise BatcherClosedError()
        return f"ran on {version}"

    answer = asyncio.run(on_current_version(resolve, lambda v: closed_until(SWAP_ATTEMPTS, v)))
    assert answer == f"ran on {SWAP_ATTEMPTS}"
    resolved.clear()
    with pytest.raises(BatcherClosedError):  # swapped on every attempt: a reload loop, not a swap
        asyncio.run(on_current_version(resolve, lambda v: closed_until(SWAP_ATTEMPTS + 1, v)))
    assert len(resolved) == SWAP_ATTEMPTS


def test_an_item_may_wait_longer_or_shorter_than_the_batcher_default(tiny: LoadedVersion) -> None:
    """Per-item delays (session steps under keyboard load): a waiting item is joined by one that
    arrives within its delay; an item that may not wait starts the batch at once."""
    batcher = make_batcher(tiny, max_queue_delay=0.0, workers=1)
    try:
        first = batcher.submit(WorkItem(np.array([1]), max_delay=2.0))
        time.sleep(0.05)
        second = batcher.submit(WorkItem(np.array([2]), max_delay=2.0))
        start = time.monotonic()
        urgent = batcher.submit(WorkItem(np.array([3])))  # the batcher's default: no wait
        results = [f.result(timeout=5) for f in (first, second, urgent)]
        assert time.monotonic() - start < 1.0  # the urgent item did not wait out the others' 2 s
        assert [r.batch_size for r in results] == [3, 3, 3]
    finally:
        batcher.close()
    patient = make_batcher(tiny, max_queue_delay=5.0, workers=1)
    try:
        start = time.monotonic()
        assert patient.submit(WorkItem(np.array([1]), max_delay=0.0)).result(timeout=5).batch_size == 1
        assert time.monotonic() - start < 1.0
    finally:
        patient.close()


def test_pace_says_wait_only_while_other_sources_come_often_and_overlap() -> None:
    """Session steps wait for companions only under load from other sessions: a lone client's
    steps, however fast, never do, nor those of one client taking turns between sessions (each
    sent when the last is answered); a wait of 0 never does."""
    from service.engine.batcher import Pace

    pace = Pace()
    assert pace.delay("a", 0.004) is None  # idle for long
    assert all(pace.delay("a", 0.004) is None for _ in range(100))  # one source alone, µs apart
    turns = []
    for i in range(100):  # one client, two sessions in turn, µs apart: never overlapping
        with pace.step(f"s{i % 2}", 0.004) as delay:
            turns.append(delay)
    assert set(turns) == {None} and pace.gap < 0.004
    waits = []
    for i in range(100):  # seven sessions, each step arriving while others are outstanding
        with pace.step(f"s{i % 7}", 0.004) as delay:
            waits.append(delay)
            pace.delay(f"s{(i + 1) % 7}", 0.004)
    assert waits[0] is None and waits[-1] == 0.004
    assert pace.delay("s1", 0.0) is None
