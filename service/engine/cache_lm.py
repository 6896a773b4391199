"""The cache language model: a text's own recent words, mixed into the model's next-word distribution.

Text repeats itself (names, topic words, phrases), so the words a writer has just used are far
likelier than the model alone says. The cache is a decayed n-gram model over the last ``window``
words of the context (Kuhn & De Mori's cache, extended to bigrams and trigrams):

* unigram: ``u(w)`` = decayed share of ``w`` among the last ``window`` words (the most recent word
  weighs 1, the one before ``decay``, then ``decay²``, ...);
* bigram / trigram: ``b(w)``, ``t(w)`` = the same, counting only the positions whose preceding one
  (two) words equal the current last one (two), i.e. what followed this context before.

The mixture is ``p(w) = (1 − Λ)·p_model(w) + λ1·u(w) + a2·b(w) + a3·t(w)`` with
``a_k = λ_k · c_k / (c_k + κ)``, ``c_k`` the decayed count of the context (so a context seen once
weighs less than one seen often, and an unseen one not at all) and ``Λ`` the sum of the weights in
use. Every parameter is fitted on held-out text by ``nextword-train fit-cache`` and stored under
``cache`` in ``model.json``; a model without that section is served unmixed.

Why an n-gram cache over word ids and not a continuous (pointer) cache over hidden states: measured
on Brown-LM valid with the default model, the n-gram cache over 2,000 words (8 KB of ids) removes
20% of perplexity, as much as a pointer cache over whole documents (21%, with 400 floats per
position), while a pointer cache that fits a 64 KB session record (~70 positions at float16) gives
13%. It needs nothing from the graphs but word ids, so it works on any exported model, and it is a
pure function of the words, which keeps sessions exactly equal to stateless prediction. Nor does a
pointer cache add much beside it: with brown-lstm/3 on Brown-LM valid (top-layer states of the
predict graph stepped one token at a time; the pointer's sharpness and weight fitted on valid), over
the 128 last positions (what int8 vectors fit in a record) it takes perplexity from 103.82 to 102.49
and keystroke savings from 50.67% to 50.70%; over 2,000 positions, 101.31 and 50.77%.

Everything here is a pure function of ``(model row, context words)``: the session path, stateless
prediction and the evaluation (``training/cache_eval.py``) call the same functions, and a cache of
a session's next-word distribution must hold :class:`AdaptedRow` (the mixed row plus the session's
new words), not the model's raw row.

**New words.** Words outside the vocabulary (``<unk>`` to the model) that were typed at least
``min_count`` times in the window (in any case) are offered: the mixed probability of ``<unk>`` is
shared among them in proportion to their decayed counts. A word may be offered after its first use
instead (``first_use``, the service's ``NEXTWORD_NEW_WORD_FIRST_USE``) when it is letters only and
no single typing error separates it from a vocabulary word (:meth:`Vocab.near_word`): then it is
no slip on a known word, and waiting for its second use only costs the writer keystrokes. Measured
on Brown-LM valid with the default model (98,035 typed words, cache on, top 3, the service's
selection): keystroke savings 50.67% after two uses, 51.09% with this rule, 51.14% after one use
whatever the word. The rule keeps nearly all of the gain, while every one-error typo of a known
word ("teh", "quikc") still waits for its second use. The context words given here may carry
their written case (the model reads the ids of their lowercase): a new word is then the lowercase
word, as the vocabulary's are, and keeps the form it was last written in ("Ierulli") for display.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from nextword.vocab import Vocab
from service.engine.vocab_index import VocabIndex

KIND = "ngram-cache/1"


@lru_cache(maxsize=16)
def _decay_powers(decay: float, window: int) -> tuple[np.ndarray, np.ndarray]:
    """``decay ** a`` for ``a`` = 0 .. window − 1 and their running sums, computed once per
    ``(decay, window)``: the copy of the parameters that a smaller ``NEXTWORD_CACHE_WINDOW_WORDS``
    bounds (:meth:`CacheParams.limited`, made on each commit) shares them instead of recomputing them."""
    powers = np.power(decay, np.arange(window, dtype=np.float64))
    sums = np.cumsum(powers)
    powers.flags.writeable = sums.flags.writeable = False
    return powers, sums


@dataclass(frozen=True)
class CacheParams:
    """The fitted mixture (``model.json`` → ``cache``)."""

    window: int  # words of context the cache counts
    decay: float  # per-word decay of a remembered word's weight
    weights: tuple[float, float, float]  # λ1, λ2, λ3: unigram, bigram, trigram
    kappa: float  # context-count smoothing of the bigram/trigram weights

    def __post_init__(self) -> None:
        if self.window < 1 or not 0 < self.decay <= 1 or self.kappa < 0:
            raise ValueError("cache: window >= 1, 0 < decay <= 1 and kappa >= 0 are required")
        if len(self.weights) != 3 or min(self.weights) < 0 or sum(self.weights) >= 1:
            raise ValueError("cache: three weights >= 0 summing to less than 1 are required")

    @property
    def powers(self) -> np.ndarray:
        """``decay ** a`` for ``a`` = 0 .. window − 1: the weight of the word ``a`` places before the last."""
        return _decay_powers(self.decay, self.window)[0]

    @property
    def power_sums(self) -> np.ndarray:
        """``power_sums[a]`` = the sum of ``powers[: a + 1]``: the total weight of the last ``a + 1`` words."""
        return _decay_powers(self.decay, self.window)[1]

    @property
    def history(self) -> int:
        """Words of context the mixture reads: the window plus the trigram's two context words."""
        return self.window + 2

    def limited(self, window: int | None) -> CacheParams:
        """The same mixture over at most ``window`` words (a service-side bound on session size)."""
        if window is None or window >= self.window:
            return self
        return CacheParams(max(1, window), self.decay, self.weights, self.kappa)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "window": self.window, "decay": self.decay, "weights": list(self.weights),
                "kappa": self.kappa}

    @classmethod
    def from_card(cls, section: Mapping[str, Any] | None) -> CacheParams | None:
        """The parameters of a ``model.json`` ``cache`` section; ``None`` when there is none."""
        if not section:
            return None
        if section.get("kind") != KIND:
            raise ValueError(f"cache kind {section.get('kind')!r} is not {KIND!r}")
        return cls(int(section["window"]), float(section["decay"]),
                   tuple(float(w) for w in section["weights"]), float(section["kappa"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class CacheDistribution:
    """The cache's share of the next word: ``p(w) = (1 − keep_out)·p_model(w) + Σ probs[ids == w]``."""

    keep_out: float  # Λ: the probability mass the cache takes from the model
    ids: np.ndarray  # distinct word ids with cache probability
    probs: np.ndarray  # their cache probability (already weighted; sums to keep_out)


EMPTY = CacheDistribution(0.0, np.empty(0, np.int64), np.empty(0, np.float64))


def cache_distribution(history: Sequence[int] | np.ndarray, params: CacheParams) -> CacheDistribution:
    """The cache component after ``history`` (the context's word ids, oldest first; only the last
    ``params.history`` matter). This runs on every committed word of every session, so it is a few
    whole-array numpy passes over at most ``params.history`` ids (the decay powers are computed
    once per parameter set), not a loop over the words."""
    h = np.asarray(history, dtype=np.int64)[-params.history :]
    n = h.size
    if n == 0:
        return EMPTY
    l1, l2, l3 = params.weights
    powers = params.powers  # powers[a] = decay ** a: the weight of the word a places before the last
    start = max(0, n - params.window)  # the positions the window counts (age <= window)
    parts_ids: list[np.ndarray] = []
    parts_probs: list[np.ndarray] = []
    keep_out = 0.0
    if l1 > 0:
        span = n - start
        parts_ids.append(h[start:])
        parts_probs.append(powers[span - 1 :: -1] * (l1 / float(params.power_sums[span - 1])))
        keep_out += l1

    def add_context(match: np.ndarray, weight: float) -> None:
        # what followed this context before: a context seen ``total`` (decayed) times gets weight
        # × total / (total + kappa)
        nonlocal keep_out
        match = match[match >= start]
        if match.size:
            w = powers[n - 1 - match]
            total = float(w.sum())
            a = weight * total / (total + params.kappa)
            parts_ids.append(h[match])
            parts_probs.append(w * (a / total))
            keep_out += a

    if n >= 2 and l2 > 0:
        # positions m >= 1 whose previous word is the current last word (m < n: only seen words)
        add_context(np.flatnonzero(h[:-1] == h[-1]) + 1, l2)
    if n >= 3 and l3 > 0:
        add_context(np.flatnonzero((h[:-2] == h[-2]) & (h[1:-1] == h[-1])) + 2, l3)
    if not parts_ids:
        return EMPTY
    all_ids = np.concatenate(parts_ids) if len(parts_ids) > 1 else parts_ids[0]
    # Summed per word id by counting into an array as long as the largest id (4 µs; the weights
    # are all positive, so the words with a share are the non-zero counts) rather than through
    # np.unique, which sorts the window (30 µs).
    dense = np.bincount(all_ids, weights=np.concatenate(parts_probs) if len(parts_probs) > 1 else parts_probs[0])
    uniq = (dense != 0).nonzero()[0]
    return CacheDistribution(keep_out, uniq, dense[uniq])


def mix(log_probs: np.ndarray, cache: CacheDistribution) -> np.ndarray:
    """The model's next-word log-probabilities with the cache mixed in (a new float32 row)."""
    row = np.asarray(log_probs, dtype=np.float32)
    if cache.keep_out <= 0:
        return row.copy()
    out = row + np.float32(math.log1p(-cache.keep_out))
    out[cache.ids] = np.logaddexp(out[cache.ids].astype(np.float64), np.log(cache.probs)).astype(np.float32)
    return out


@dataclass(frozen=True)
class AdaptedRow:
    """A next-word distribution ready for selection: the (mixed) vocabulary row and the new words
    offered beside it (spelled as typed), with their log-probabilities.

    The vocabulary row is by word id (``log_probs``) or ranked (``ranked_log_probs``: in the
    vocabulary index's sorted order, what selection reads; :meth:`ranked` makes it once). The
    keystroke cache keeps only the ranked one."""

    log_probs: np.ndarray | None
    new_words: tuple[str, ...] = ()
    new_log_probs: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    new_written: tuple[str, ...] = ()  # each new word as last written (case kept); () = as new_words
    ranked_log_probs: np.ndarray | None = None

    def ranked(self, index: VocabIndex) -> np.ndarray:
        """The vocabulary row in ``index``'s sorted order (made on first use and kept: every
        version of a vocabulary sorts it the same way)."""
        if self.ranked_log_probs is None:
            assert self.log_probs is not None
            object.__setattr__(self, "ranked_log_probs", index.arrange(self.log_probs))
        assert self.ranked_log_probs is not None
        return self.ranked_log_probs

    @cached_property
    def best_log_prob(self) -> float:
        """The row's highest log-probability (in whichever order it is held), computed once: a
        session's keystrokes inside a word all select from the same (cached) row."""
        return float(np.max(self.log_probs if self.log_probs is not None else self.ranked_log_probs))

    def written(self, word: str) -> str:
        """How a new word was written (the word itself when not known)."""
        if self.new_written:
            for w, form in zip(self.new_words, self.new_written, strict=True):
                if w == word:
                    return form
        return word


def new_words(
    words: Sequence[str], ids: Sequence[int] | np.ndarray, unk_id: int, unk_log_prob: float, window: int,
    decay: float, min_count: int, first_use: Callable[[str], bool] | None = None,
) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """Out-of-vocabulary words of the last ``window`` context words typed at least ``min_count``
    times there (in lowercase, whatever their case), or once when ``first_use`` says so of the
    word, sharing the (mixed) ``<unk>`` probability by decayed count, most recent first on ties;
    and each as last written."""
    words = list(words)[-window:]
    ids = np.asarray(ids, dtype=np.int64)[-window:]
    oov = np.flatnonzero(ids == unk_id)
    if oov.size == 0:
        return (), np.empty(0, np.float64), ()
    n = ids.size
    counts: dict[str, int] = {}
    weight: dict[str, float] = {}
    written: dict[str, str] = {}  # the last written form of each
    for m in oov.tolist():
        w = words[m].lower()
        if w.startswith("<"):  # a literal "<unk>" typed by the user is no word to offer
            continue
        counts[w] = counts.get(w, 0) + 1
        weight[w] = weight.get(w, 0.0) + decay ** (n - m - 1)
        written[w] = words[m]
    total = sum(weight.values())
    chosen = sorted((w for w, c in counts.items() if c >= min_count or (first_use is not None and first_use(w))),
                    key=lambda w: (-weight[w], w))
    if not chosen or total <= 0:
        return (), np.empty(0, np.float64), ()
    lps = np.asarray([unk_log_prob + math.log(weight[w] / total) for w in chosen], dtype=np.float64)
    return tuple(chosen), lps, tuple(written[w] for w in chosen)


def adapt(
    log_probs: np.ndarray, words: Sequence[str], ids: Sequence[int] | np.ndarray, params: CacheParams | None,
    unk_id: int, min_count: int, first_use: Callable[[str], bool] | None = None,
) -> AdaptedRow:
    """The distribution a writer's context gives: ``log_probs`` (the model's row after ``words``,
    whose ids are ``ids``) mixed with the cache over those words, plus the new words (see
    :func:`new_words`). With no parameters (a model without a fitted cache, or adaptation off) the
    row is unchanged."""
    if params is None:
        return AdaptedRow(np.asarray(log_probs))
    ids = np.asarray(ids, dtype=np.int64)[-params.history :]
    row = mix(log_probs, cache_distribution(ids, params))
    if min_count <= 0:
        return AdaptedRow(row)
    found, lps, written = new_words(words[-params.history :], ids, unk_id, float(row[unk_id]), params.window,
                                    params.decay, min_count, first_use)
    return AdaptedRow(row, found, lps, written if written != found else ())


def first_use_rule(vocab: Vocab, on: bool = True) -> Callable[[str], bool] | None:
    """Which new words are offered after their first use: letters only, and no slip on a word of
    ``vocab`` (one typing error away from none of them); ``None`` when the rule is off
    (``NEXTWORD_NEW_WORD_FIRST_USE``), so every caller reads the setting the same way."""
    if not on:
        return None
    return lambda word: word.isalpha() and not vocab.near_word(word)


@dataclass(frozen=True)
class Selection:
    """The words offered, best first: vocabulary ids (``-1`` for a new word), log-probabilities
    (renormalised over the prefix's matches when there is a prefix), the probability of every
    eligible word matching the prefix, and how many there are."""

    words: list[str]
    ids: list[int]
    log_probs: list[float]
    mass: float
    matches: int


def select_words(
    index: VocabIndex, row: AdaptedRow, k: int, prefix: str = "", exclude: frozenset[str] = frozenset(),
    filtered: bool = False,
) -> Selection:
    """Top-``k`` over the vocabulary row and the new words together, completing ``prefix``;
    words in ``exclude`` (suggestion rotation: offered earlier for this word and passed over) are
    skipped without changing the others' probabilities. ``filtered``: blocklisted words, in the
    vocabulary or new, are not eligible (``service/engine/blocklist.py``)."""
    top = index.top_k_ranked(row.ranked(index), k + len(exclude), prefix, filtered=filtered)
    vocab_words, ids, lps = index.decode(top.ids), top.ids.tolist(), top.log_probs.tolist()
    extra = []
    if row.new_words:
        blocked = index.blocked_words if filtered else frozenset()
        extra = [(w, float(lp)) for w, lp in zip(row.new_words, row.new_log_probs, strict=True)
                 if w.startswith(prefix) and w not in blocked]
    if not extra:
        kept = [j for j, w in enumerate(vocab_words) if w not in exclude][:k]
        return Selection([vocab_words[j] for j in kept], [ids[j] for j in kept], [lps[j] for j in kept], top.mass,
                         top.matches)
    # top_k renormalised over the prefix's vocabulary matches: back to absolute probabilities,
    # then over the vocabulary's and the new words' matches together.
    shift = math.log(top.mass) if prefix and top.mass > 0 else 0.0
    entries = [(lp + shift, w, i) for w, i, lp in zip(vocab_words, ids, lps, strict=True)]
    entries += [(lp, w, -1) for w, lp in extra]
    mass = top.mass + sum(math.exp(lp) for _, lp in extra)
    entries.sort(key=lambda e: -e[0])  # stable: vocabulary ties stay in id order, new words after them
    entries = [e for e in entries if e[1] not in exclude][:k]
    norm = math.log(mass) if prefix and mass > 0 else 0.0
    return Selection([e[1] for e in entries], [e[2] for e in entries], [e[0] - norm for e in entries], mass,
                     top.matches + len(extra))
