"""Typo-tolerant completion: words the fragment being typed may stand for when it was mistyped.

A fragment ``f`` is explained by an *intended prefix* ``p`` one keyboard error away (Damerau
distance 1): a substitution (likely when the two keys are QWERTY neighbours), a transposition of
two adjacent letters, an omitted letter (likelier when it was a doubled one) or an extra letter
(likelier when it repeats or neighbours the letter beside it). Every vocabulary word starting
with ``p`` is then a candidate, so both whole-word typos ("teh" → "the") and typos in a word
still being typed ("presidn" → "president") are found. A candidate ``w`` scores

    log P_model(w | context) + log P_error(f | p)

and the words that really start with ``f`` score ``log P_model(w | context) + log P(no error)``,
so corrections enter the suggestions only when the fragment's own matches are few or unlikely.

Cost: no model work (the keystroke's next-word row is reused) and no loop over the vocabulary.
At load every vocabulary prefix gets its range in the sorted vocabulary and the letters that
extend it (a trie in one dict, ~49,000 prefixes for the default model). A request walks the
fragment down that trie, tries one error at each position using only the letters that extend the
prefix there, and scores the ranges of the prefixes it reaches with numpy at once.

Which words a fragment may stand for, and at what error weight, depends on the fragment alone,
not on the context: those candidates (positions and weights) are kept per fragment in a small LRU
(:data:`CANDIDATE_CACHE_BYTES`), so a keystroke whose fragment was seen before (most of them:
typists type the same common words) only gathers the row at the candidates' positions and ranks
them (measured on brown-lstm/2: ~105 µs of building → ~10 µs per keystroke). Candidates are
positions in the sorted vocabulary, and the row is read ranked (``service/engine/vocab_index.py``):
a fragment's candidates are a few runs of neighbouring words, so gathering them reads a few cache
lines rather than one per candidate. A candidate costs 8 bytes (an int32 position, a float32
weight): the fragments typed by 192 typists of the keyboard
benchmark (20,230 distinct) hold 13.3 MB of candidates, so 16 MB keeps them all; at 8 MB the
cache missed 2.3 times as often. A miss builds the fragment's candidates (~42 µs with the default
model): its one-error prefixes extend those of the fragment one letter shorter, typed just before.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from service.engine.vocab_index import VocabIndex

QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")

# P(f | p) of each kind of error, against P(no error) for the fragment's own matches. Relative
# weights, not a normalised distribution: neighbour keys and transpositions dominate touch typing.
# Chosen on Brown-LM *valid* (600 words, ``benchmarks/suggest.py``'s typos): these weights with a
# 1% posterior floor, against a third of them with 5%, put the intended word in the top 3 for
# 94.8% of typos instead of 91.7%, while correctly typed words lost first place 95.5% → 95.3%
# (95.8% with no corrections); ten times these weights: 95.5% of typos, but 94.2% first places.
P_NO_ERROR = 0.95
ERROR_LOG_PROB = {
    "substitute_adjacent": math.log(0.030),
    "substitute": math.log(0.0015),
    "transpose": math.log(0.024),
    "omit_double": math.log(0.030),  # "ocur" for "occur"
    "omit": math.log(0.015),
    "double": math.log(0.024),  # "occcur" for "occur"
    "insert_adjacent": math.log(0.015),  # a neighbour key hit too
    "insert": math.log(0.0009),
}
LOG_NO_ERROR = math.log(P_NO_ERROR)
MAX_ERROR_LOG_PROB = max(ERROR_LOG_PROB.values())
MIN_FRAGMENT = 2  # one letter is too little to call anything a typo
MAX_FRAGMENT = 32  # longer fragments are not words being typed; no corrections
# Candidates kept per model version (8 bytes per candidate: an int32 position and a float32 weight; a
# two-letter fragment has a few thousand, a longer one tens): the fragments typed most recently.
CANDIDATE_CACHE_BYTES = 16 << 20
# Fragments whose one-error prefixes are kept to extend by the next letter: the last keystroke of
# every typist typing now (a dict of a few dozen short strings each).
REACHABLE_MEMO = 4096


def qwerty_neighbours() -> dict[str, frozenset[str]]:
    """Keys touching each letter key on a staggered QWERTY layout (row above: same column and the
    next; row below: the previous column and the same)."""
    out: dict[str, set[str]] = {}
    for r, row in enumerate(QWERTY_ROWS):
        for c, key in enumerate(row):
            near = out.setdefault(key, set())
            for rr, cols in ((r, (c - 1, c + 1)), (r - 1, (c, c + 1)), (r + 1, (c - 1, c))):
                if 0 <= rr < len(QWERTY_ROWS):
                    near.update(QWERTY_ROWS[rr][cc] for cc in cols if 0 <= cc < len(QWERTY_ROWS[rr]))
    return {k: frozenset(v) for k, v in out.items()}


NEIGHBOURS = qwerty_neighbours()


def _wordlike(fragment: str) -> bool:
    """Letters (and inner apostrophes/hyphens): numbers and abbreviations are not corrected."""
    return fragment.replace("'", "").replace("-", "").isalpha()


def _adjacent(a: str, b: str) -> bool:
    return b in NEIGHBOURS.get(a, ())


class Bar(NamedTuple):
    """What a correction must score to be worth ranking: at least ``floor`` and more than
    ``beat``. Below it no candidate could enter the answer, so only their best score is read."""

    floor: float = -math.inf
    beat: float = -math.inf

    def cleared_by(self, score: float) -> bool:
        return score >= self.floor and score > self.beat


NO_BAR = Bar()


@dataclass(frozen=True)
class Corrections:
    """Correction candidates for one fragment, best first: vocabulary ids, their joint scores
    (model log-prob + error log-prob) and the log of the summed joint probability of *all*
    candidates (to normalise against the fragment's own matches)."""

    ids: np.ndarray
    scores: np.ndarray
    log_total: float

    @property
    def empty(self) -> bool:
        return self.ids.size == 0


NO_CORRECTIONS = Corrections(np.empty(0, np.int64), np.empty(0, np.float64), -math.inf)


@dataclass(frozen=True)
class _Candidates:
    """The words one fragment may stand for (context-free): their positions in the sorted
    vocabulary, ascending, with their error log-prob."""

    positions: np.ndarray
    weights: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.weights.nbytes + 200  # + the objects around them


_NONE = _Candidates(np.empty(0, np.int32), np.empty(0, np.float32))


class Corrector:
    """Per model version: the prefix trie of its vocabulary (built at load)."""

    def __init__(self, index: VocabIndex) -> None:
        self.index = index
        # Every prefix of a vocabulary word -> (lo, hi, next letters): its range in the sorted
        # vocabulary and the characters that extend it (a trie flattened into one dict).
        spans: dict[str, list] = {}
        for pos, word in enumerate(index.sorted_words):
            if word.startswith("<"):
                continue
            for i in range(len(word) + 1):
                node = spans.get(word[:i])
                if node is None:
                    spans[word[:i]] = node = [pos, pos + 1, set()]
                node[1] = pos + 1
                if i < len(word):
                    node[2].add(word[i])
        # Tried characters: letters and the marks that occur inside words.
        self.nodes: dict[str, tuple[int, int, str]] = {
            p: (lo, hi, "".join(sorted(c for c in kids if c.isalpha() or c in "'-")))
            for p, (lo, hi, kids) in spans.items()
        }
        # (fragment, filtered, backoff) -> its candidates; the lock: selection may run off the loop
        self._cache: OrderedDict[tuple[str, bool, bool], _Candidates] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._reach: OrderedDict[str, dict[str, float]] = OrderedDict()  # fragment -> _reachable()

    @property
    def prefixes(self) -> int:
        return len(self.nodes) - 1  # the empty prefix is the root

    def variants(self, fragment: str) -> dict[str, float]:
        """Intended prefixes one error away from ``fragment`` that begin some vocabulary word,
        with the error's log-probability (the likeliest error when several lead to one).

        Walks the fragment down the prefix trie: an error at position i needs ``fragment[:i]``
        to be a prefix, and only the letters that extend it are tried, so the work follows the
        vocabulary's real branching instead of the alphabet."""
        out = {p: lp for p, lp in self._reachable(fragment).items() if not p.startswith(fragment)}
        out.pop("", None)
        return out

    def _reachable(self, f: str) -> dict[str, float]:
        """Every trie prefix one error away from ``f`` (its own extensions and "" included), kept
        for the fragments seen last. A keyboard sends a word one letter at a time, and an error
        before the last two letters of ``f`` is an error of ``f[:-1]`` with the last letter
        appended (the same kind: it depends on the letters around it, which ``f[:-1]`` has), so
        ``f`` extends the answer for ``f[:-1]`` and tries errors only at its last two positions
        (the one before last: an extra key there may now repeat or neighbour the new letter)."""
        memo, n, nodes = self._reach, len(f), self.nodes
        with self._lock:
            found = memo.get(f)
            if found is not None:
                memo.move_to_end(f)
                return found
            before = memo.get(f[:-1]) if n >= 2 else None
        if before is None:
            found = {}
            for i in range(n):
                if not self._errors_at(f, i, found):
                    break
        else:
            last = f[-1]
            found = {p + last: lp for p, lp in before.items() if p + last in nodes}
            if self._errors_at(f, n - 2, found):
                self._errors_at(f, n - 1, found)
        with self._lock:
            memo[f] = found
            if len(memo) > REACHABLE_MEMO:
                memo.popitem(last=False)
        return found

    def _errors_at(self, f: str, i: int, out: dict[str, float]) -> bool:
        """Add the prefixes one error at position ``i`` of ``f`` gives (with the likeliest error's
        log-prob); False when ``f[:i]`` is no prefix, so neither this position nor any later one
        can give one."""
        head = f[:i]
        node = self.nodes.get(head)
        if node is None:
            return False
        nodes, n = self.nodes, len(f)

        def offer(p: str, kind: str) -> None:
            if p in nodes:
                lp = ERROR_LOG_PROB[kind]
                if lp > out.get(p, -math.inf):
                    out[p] = lp

        kids, typed, tail = node[2], f[i], f[i + 1:]
        near = NEIGHBOURS.get(typed, ())
        for c in kids:
            if c != typed:  # f[i] typed for c
                offer(head + c + tail, "substitute_adjacent" if c in near else "substitute")
            # c left out before f[i] (left out at the very end is just not typed yet)
            offer(head + c + f[i:], "omit_double" if c == typed or (i and c == f[i - 1]) else "omit")
        # f[i] is an extra key: a repeat, a neighbour of the letter beside it, or any other
        beside = [f[j] for j in (i - 1, i + 1) if 0 <= j < n]
        if typed in beside:
            kind = "double"
        elif any(typed in NEIGHBOURS.get(b, ()) for b in beside):
            kind = "insert_adjacent"
        else:
            kind = "insert"
        offer(head + tail, kind)
        if i + 1 < n and f[i + 1] != typed:
            offer(head + f[i + 1] + typed + f[i + 2:], "transpose")
        return True

    def correct(self, ranked: np.ndarray, fragment: str, k: int, filtered: bool = True,
                bar: Bar = NO_BAR) -> Corrections:
        """The ``k`` best correction candidates for ``fragment`` under one next-word log-prob row,
        ranked (``VocabIndex.arrange``); none when no candidate clears ``bar`` (then only their
        best score is computed: a two-letter fragment has some 3,000 candidates)."""
        if not MIN_FRAGMENT <= len(fragment) <= MAX_FRAGMENT or k <= 0 or not _wordlike(fragment):
            return NO_CORRECTIONS
        order = self.index.sorted_ids
        found = _score(ranked, order, self._candidates(fragment, filtered, False), k, bar)
        if found is not None and found.empty:  # nothing one error away: back off
            found = _score(ranked, order, self._candidates(fragment, filtered, True), k, bar)
        return NO_CORRECTIONS if found is None else found

    def _candidates(self, fragment: str, filtered: bool, backoff: bool) -> _Candidates:
        key = (fragment, filtered, backoff)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        variants = self._backoff(fragment, filtered) if backoff else self.variants(fragment)
        found = self._build(fragment, variants, filtered)
        with self._lock:
            if key not in self._cache and found.nbytes <= CANDIDATE_CACHE_BYTES:
                self._cache[key] = found
                self._cache_bytes += found.nbytes
                while self._cache_bytes > CANDIDATE_CACHE_BYTES:
                    _, oldest = self._cache.popitem(last=False)
                    self._cache_bytes -= oldest.nbytes
        return found

    def _build(self, fragment: str, variants: dict[str, float], filtered: bool) -> _Candidates:
        if not variants:
            return _NONE
        index, nodes = self.index, self.nodes
        # Prefix ranges of a sorted vocabulary nest or are disjoint; give every position the best
        # error weight of the ranges holding it, in sorted-position space: painted likeliest last.
        spans = sorted((lp, *nodes[p][:2]) for p, lp in variants.items())
        lo, hi = min(s[1] for s in spans), max(s[2] for s in spans)
        weight = np.full(hi - lo, -np.inf, dtype=np.float32)
        for lp, a, b in spans:
            weight[a - lo:b - lo] = lp
        flo, fhi = index.prefix_range(fragment)
        weight[max(flo, lo) - lo:max(min(fhi, hi), lo) - lo] = -np.inf  # its own matches are not corrections
        positions = np.flatnonzero(weight != -np.inf)
        weights = weight[positions]
        positions += lo
        keep = index.eligible_at(filtered)[positions]
        positions, weights = positions[keep], weights[keep]
        if positions.size == 0:
            return _NONE
        positions = positions.astype(np.int32)
        positions.flags.writeable = weights.flags.writeable = False  # shared by every request for the fragment
        return _Candidates(positions, weights)

    def _eligible_outside(self, prefix: str, fragment: str, filtered: bool) -> bool:
        """Whether some offerable word starts with ``prefix`` but not with ``fragment``."""
        lo, hi = self.index.prefix_range(prefix)
        flo, fhi = self.index.prefix_range(fragment)
        ids = np.concatenate([self.index.sorted_ids[lo:min(hi, flo)], self.index.sorted_ids[max(lo, fhi):hi]])
        return bool(self.index.eligible(filtered)[0][ids].any())

    def _backoff(self, fragment: str, filtered: bool) -> dict[str, float]:
        """Nothing one error away: the longest prefix of the fragment with offerable completions,
        its dropped letters counted as extra keys (so every prefix of a blocked word still offers
        something)."""
        for j in range(len(fragment) - 1, 0, -1):
            if self._eligible_outside(fragment[:j], fragment, filtered):
                return {fragment[:j]: ERROR_LOG_PROB["insert"] * (len(fragment) - j)}
        return {}


def _score(ranked: np.ndarray, order: np.ndarray, candidates: _Candidates, k: int,
           bar: Bar = NO_BAR) -> Corrections | None:
    """The ``k`` best of a fragment's candidates under one ranked row (model log-prob + error
    log-prob); ``order``: the word id at each sorted position. None when candidates with finite
    scores exist but none clears ``bar``."""
    positions = candidates.positions
    if positions.size == 0:
        return NO_CORRECTIONS
    scores = ranked[positions].astype(np.float64)
    scores += candidates.weights
    top = float(np.maximum.reduce(scores))
    if not math.isfinite(top) or not math.isfinite(float(np.add.reduce(scores))):
        finite = np.isfinite(scores)  # -inf in the row (or NaN): those words are no candidates
        positions, scores = positions[finite], scores[finite]
        if positions.size == 0:
            return NO_CORRECTIONS
        top = float(np.maximum.reduce(scores))
    if not bar.cleared_by(top):
        return None
    log_total = top + math.log(float(np.add.reduce(np.exp(scores - top))))
    if positions.size > k:
        part = np.argpartition(-scores, k - 1)[:k]
        positions, scores = positions[part], scores[part]
    ids = order[positions]
    best = np.lexsort((ids, -scores))
    return Corrections(ids[best].astype(np.int64), scores[best], log_total)
