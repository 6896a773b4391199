"""Section ``suggest``: typo-tolerant completion, measured for accuracy and for cost.

Accuracy. Words of the Brown-LM **test** split (letters only, at least 3 of them, in the
vocabulary), at positions drawn with the run's seed, each given one synthetic typo: a QWERTY
neighbour substituted for a letter, two adjacent different letters transposed, a letter deleted, or
a letter inserted (a neighbour of the letter beside it, or a repeat of it); the four kinds equally
often, and never a typo that leaves a prefix of the intended word (that is a word not finished
yet, not a typo). The model's next-word row at the position comes from the predict graph on the
preceding words (up to :data:`WINDOW`, from ``<eos>`` and zero state, as ``/v1/predict`` reads a
text), mixed with the version's fitted cache over those same words (``service/engine/cache_lm.py``,
as ``/v1/predict`` adapts to that text; a version without a cache section is used as is), and the
fragment goes through the service's own selection (``service.engine.suggest``):
the figure is the share of cases where the intended word is the first suggestion, and where it is
among the first three. The same words typed correctly show what corrections cost a writer who
made no typo (how often the intended word is still first). The context-free baseline ranks
vocabulary words by Damerau edit distance to the typed word, ties by corpus frequency
(vocabulary order).

Cost. The same selection with corrections on and off over the sampled rows, each call timed
with the thread's CPU clock: the median and p99 CPU time per request, and the difference the
corrections make. No model work is involved (the keystroke's row is given).
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from benchmarks.common import Context, Row, at_most, log, percentile

WINDOW = 32  # preceding words read for each sampled position
KINDS = ("substitute", "transpose", "delete", "insert")
CORPUS = "../shared/data/brown"
TARGET_CPU_MS = 2.0


def make_typo(word: str, kind: str, rng: np.random.Generator) -> str | None:
    """One typo of ``kind`` in ``word``, or None when the word has no such typo."""
    from service.engine.correct import NEIGHBOURS

    n = len(word)
    if kind == "substitute":
        spots = [i for i in range(n) if word[i] in NEIGHBOURS]
        if not spots:
            return None
        i = int(rng.choice(spots))
        return word[:i] + str(rng.choice(sorted(NEIGHBOURS[word[i]]))) + word[i + 1:]
    if kind == "transpose":
        spots = [i for i in range(n - 1) if word[i] != word[i + 1]]
        if not spots:
            return None
        i = int(rng.choice(spots))
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "delete":
        i = int(rng.integers(0, n - 1))  # never the last letter: that leaves a prefix
        return word[:i] + word[i + 1:]
    i = int(rng.integers(0, n))  # insert before word[i] (a repeat or a neighbour of a letter beside it)
    beside = [word[j] for j in (i - 1, i) if 0 <= j < n]
    choices = sorted({c for b in beside for c in NEIGHBOURS.get(b, ())} | set(beside))
    return word[:i] + str(rng.choice(choices)) + word[i:]


def baseline(typed: str, index: Any, k: int) -> list[int]:
    """Context-free: the typed word itself if it is a word, then words one error away (Damerau
    distance 1), most frequent first; distance 2 only when nothing lies within 1."""
    vocab = index.vocab
    allowed = index.allowed_filtered
    exact = [vocab.stoi[typed]] if typed in vocab.stoi and allowed[vocab.stoi[typed]] else []
    alphabet = "".join(sorted({c for w in vocab.itos for c in w if c.isalpha()}))
    near = _edits(typed, alphabet)
    ids = sorted(vocab.stoi[w] for w in near if w in vocab.stoi and w != typed and allowed[vocab.stoi[w]])
    if not exact and not ids:
        far = {e2 for e in near for e2 in _edits(e, alphabet)}
        ids = sorted(vocab.stoi[w] for w in far if w in vocab.stoi and allowed[vocab.stoi[w]])
    return (exact + ids)[:k]


def _edits(word: str, alphabet: str) -> set[str]:
    n = len(word)
    out = {word[:i] + word[i + 1:] for i in range(n)}
    out |= {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(n - 1)}
    out |= {word[:i] + c + word[i + 1:] for i in range(n) for c in alphabet}
    out |= {word[:i] + c + word[i:] for i in range(n + 1) for c in alphabet}
    return out


def _samples(ctx: Context, vocab: Any, count: int, split: str = "test") -> list[tuple[list[str], str]]:
    """``(preceding words, intended word)`` at ``count`` positions of a split (test for the
    figures; the error model's constants were chosen looking at valid only)."""
    from training.data import brown_lm

    test = getattr(brown_lm(CORPUS), split)
    rng = np.random.default_rng(ctx.seed)
    eligible = [i for i, w in enumerate(test) if len(w) >= 3 and w.isalpha() and w in vocab.stoi]
    picked = sorted(rng.choice(eligible, size=min(count, len(eligible)), replace=False).tolist())
    return [(test[max(0, i - WINDOW):i], test[i]) for i in picked]


def _rows(ctx: Context, vocab: Any, contexts: list[list[str]]) -> np.ndarray:
    """The predict graph's next-word row after each context (``<eos>`` first, zero state)."""
    from benchmarks.runtime import ort_session
    from nextword import artifact as A

    card = ctx.card
    session = ort_session(ctx.model_dir / card.graphs["predict"], ctx.threads)
    rows = []
    for start in range(0, len(contexts), 64):
        chunk = contexts[start:start + 64]
        ids = [[vocab.eos_id, *vocab.encode(c)] for c in chunk]
        width = max(len(x) for x in ids)
        tokens = np.zeros((len(ids), width), dtype=np.int64)
        for r, x in enumerate(ids):
            tokens[r, :len(x)] = x
        lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
        state = {A.state_input(n): np.zeros((card.num_layers, len(ids), card.hidden_size), np.float32)
                 for n in card.state_names}
        rows.append(session.run([A.LOG_PROBS], {A.TOKENS: tokens, A.LENGTHS: lengths, **state})[0])
    return np.concatenate(rows)


def run_suggest(ctx: Context) -> list[Row]:
    from nextword.vocab import Vocab
    from service.config import Settings
    from service.engine.blocklist import DEFAULT_BLOCKLIST, blocked_ids, read_blocklist
    from service.engine.cache_lm import CacheParams, adapt, first_use_rule
    from service.engine.correct import Corrector
    from service.engine.suggest import SuggestOptions, Writing, select
    from service.engine.vocab_index import VocabIndex

    card = ctx.card
    vocab = Vocab.load(ctx.model_dir / card.vocab_file)
    listed = read_blocklist(DEFAULT_BLOCKLIST)
    index = VocabIndex(vocab, blocked_ids(vocab, listed), listed)
    start = time.perf_counter()
    corrector = Corrector(index)
    build_ms = (time.perf_counter() - start) * 1e3
    # What select() reads of a loaded version; written forms are not part of this measurement.
    version = SimpleNamespace(vocab=vocab, index=index, corrector=corrector, casing=None)

    count = ctx.pick(2000, 300)
    log(f"suggest: {count} Brown-LM test words with one synthetic typo each")
    samples = _samples(ctx, vocab, count)
    rng = np.random.default_rng(ctx.seed + 1)
    cases: list[tuple[int, str, str, str]] = []  # (sample, kind, typed, intended)
    for n, (_, word) in enumerate(samples):
        kind = KINDS[n % len(KINDS)]
        for _ in range(10):
            typed = make_typo(word, kind, rng)
            if typed and typed != word and not word.startswith(typed):
                cases.append((n, kind, typed, word))
                break
    rows = _rows(ctx, vocab, [samples[n][0] for n, *_ in cases])
    params = CacheParams.from_card(card.cache)
    served = Settings()  # new words as the service's defaults offer them
    first_use = first_use_rule(vocab, served.new_word_first_use)
    adapted = [adapt(row, samples[n][0], vocab.encode(samples[n][0]), params, vocab.unk_id, served.new_word_min_count,
                     first_use)
               for (n, *_), row in zip(cases, rows, strict=True)]

    on, off = SuggestOptions(), SuggestOptions(corrections=False)
    hits = {"model": [0, 0], "baseline": [0, 0]}
    clean = [0, 0]  # correctly typed words first: with corrections, without
    by_kind: dict[str, list[int]] = {k: [0, 0, 0] for k in KINDS}  # cases, model top-1, baseline top-1
    cpu_on: list[float] = []
    cpu_off: list[float] = []
    key_on: list[float] = []  # a keystroke inside the same word typed correctly
    key_off: list[float] = []
    clock = time.thread_time
    for (_, kind, typed, word), row in zip(cases, adapted, strict=True):
        t0 = clock()
        chosen, _ = select(version, row, 3, typed, Writing(), on)
        t1 = clock()
        select(version, row, 3, typed, Writing(), off)
        t2 = clock()
        cpu_on.append(t1 - t0)
        cpu_off.append(t2 - t1)
        typed_so_far = word[:int(rng.integers(2, len(word)))]
        t0 = clock()
        select(version, row, 3, typed_so_far, Writing(), on)
        t1 = clock()
        select(version, row, 3, typed_so_far, Writing(), off)
        t2 = clock()
        key_on.append(t1 - t0)
        key_off.append(t2 - t1)
        words = [c.word for c in chosen]
        base = vocab.decode(baseline(typed, index, 3))
        for name, ranked in (("model", words), ("baseline", base)):
            hits[name][0] += bool(ranked) and ranked[0] == word
            hits[name][1] += word in ranked[:3]
        # The same word typed correctly: how often do corrections push it from first place?
        first_on = select(version, row, 1, word, Writing(), on)[0]
        first_off = select(version, row, 1, word, Writing(), off)[0]
        clean[0] += bool(first_on) and first_on[0].word == word
        clean[1] += bool(first_off) and first_off[0].word == word
        by_kind[kind][0] += 1
        by_kind[kind][1] += bool(words) and words[0] == word
        by_kind[kind][2] += bool(base) and base[0] == word
    total = len(cases)

    def share(x: int) -> float:
        return 100.0 * x / max(total, 1)

    kinds = ", ".join(f"{k} {100 * v[1] / max(v[0], 1):.0f}% vs {100 * v[2] / max(v[0], 1):.0f}%"
                      for k, v in by_kind.items())
    details = {"cases": total, "window_words": WINDOW, "corpus": CORPUS, "split": "test", "seed": ctx.seed,
               "cache": params is not None,
               "by_kind": {k: {"cases": v[0], "model_top1": v[1], "baseline_top1": v[2]} for k, v in by_kind.items()},
               "hits": hits}
    ms_on = [1e3 * x for x in cpu_on]
    ms_off = [1e3 * x for x in cpu_off]
    p50_on, p99_on = statistics.median(ms_on), percentile(ms_on, 99)
    p50_off = statistics.median(ms_off)
    keys_on, keys_off = [1e3 * x for x in key_on], [1e3 * x for x in key_off]
    versus = "(LM × error model vs nearest by edit distance)"
    top1, top3 = share(hits["model"][0]), share(hits["model"][1])
    out = [
        Row("suggest", f"typo in the last word: intended word first {versus}", top1, "%",
            display=f"{top1:.1f}% vs {share(hits['baseline'][0]):.1f}% ({total} Brown-LM test words, one synthetic "
            f"typo each; by kind: {kinds})", details=details),
        Row("suggest", f"typo in the last word: intended word in the top 3 {versus}", top3, "%",
            display=f"{top3:.1f}% vs {share(hits['baseline'][1]):.1f}%"),
        Row("suggest", "the same words typed correctly: intended word first, with vs without corrections",
            share(clean[0]), "%", display=f"{share(clean[0]):.1f}% vs {share(clean[1]):.1f}%",
            note="what corrections cost a writer who made no typo"),
        Row("suggest", f"CPU per request of selection with corrections (k=3, V={len(vocab):,})", p99_on, "ms",
            target=f"≤ {TARGET_CPU_MS:g} ms (p99)", met=at_most(p99_on, TARGET_CPU_MS),
            display=f"p50 {p50_on:.2f} / p99 {p99_on:.2f} / max {max(ms_on):.2f} ms; without corrections p50 "
            f"{p50_off:.2f} ms ({p50_on / max(p50_off, 1e-9):.1f}×); no model work; index built in {build_ms:.0f} ms",
            details={"p50_ms": p50_on, "p99_ms": p99_on, "max_ms": max(ms_on), "p50_off_ms": p50_off,
                     "build_ms": build_ms, "prefixes": corrector.prefixes}),
        Row("suggest", "CPU per keystroke inside a correctly typed word, with vs without corrections",
            statistics.median(keys_on), "ms",
            display=f"p50 {statistics.median(keys_on):.3f} vs {statistics.median(keys_off):.3f} ms, p99 "
            f"{percentile(keys_on, 99):.3f} vs {percentile(keys_off, 99):.3f} ms",
            note="corrections are skipped when even the row's best word times the likeliest error could not "
            "outrank the k-th completion"),
    ]
    return out
