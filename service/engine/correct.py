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
At load the set of every vocabulary prefix is built; a request enumerates the ~50·len(f) one-edit
variants of the fragment, keeps those in the prefix set, turns each into a contiguous range of the
sorted vocabulary (:meth:`VocabIndex.prefix_range`) and scores all ranges with numpy at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
MIN_FRAGMENT = 2  # one letter is too little to call anything a typo
MAX_FRAGMENT = 32  # longer fragments are not words being typed; no corrections


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


class Corrector:
    """Per model version: the prefix set and alphabet of its vocabulary (built at load)."""

    def __init__(self, index: VocabIndex) -> None:
        self.index = index
        prefixes: set[str] = set()
        letters: set[str] = set()
        for word in index.sorted_words:
            if word.startswith("<"):
                continue
            letters.update(word)
            prefixes.update(word[:i] for i in range(1, len(word) + 1))
        self.prefixes = frozenset(prefixes)
        # Substituted/omitted characters: letters and the marks that occur inside words.
        self.alphabet = "".join(sorted(ch for ch in letters if ch.isalpha() or ch in "'-"))

    def variants(self, fragment: str) -> dict[str, float]:
        """Intended prefixes one error away from ``fragment`` that begin some vocabulary word,
        with the error's log-probability (the likeliest error when several lead to one)."""
        f, n, alphabet = fragment, len(fragment), self.alphabet
        # Build every variant as a string first and intersect with the prefix set in one C-level
        # operation; only the few survivors are classified.
        subs = {f[:i] + c + f[i + 1:] for i in range(n) for c in alphabet}
        omits = {f[:i] + c + f[i:] for i in range(n) for c in alphabet}  # at the end: not typed yet
        extras = {f[:i] + f[i + 1:] for i in range(n)}
        swaps = {f[:i] + f[i + 1] + f[i] + f[i + 2:] for i in range(n - 1) if f[i] != f[i + 1]}
        found = (subs | omits | extras | swaps) & self.prefixes
        found.discard(f)
        out: dict[str, float] = {}
        for p in found:
            if p.startswith(f):
                continue  # a longer prefix of the fragment: those words are its own matches
            out[p] = max(ERROR_LOG_PROB[kind] for kind in explain(f, p))
        return out

    def correct(self, row: np.ndarray, fragment: str, k: int, filtered: bool = True) -> Corrections:
        """The ``k`` best correction candidates for ``fragment`` under one next-word log-prob row."""
        if not MIN_FRAGMENT <= len(fragment) <= MAX_FRAGMENT or k <= 0 or not _wordlike(fragment):
            return NO_CORRECTIONS
        found = self._score(row, fragment, self.variants(fragment), k, filtered)
        if found.empty:
            found = self._score(row, fragment, self._backoff(fragment, filtered), k, filtered)
        return found

    def _score(self, row: np.ndarray, fragment: str, variants: dict[str, float], k: int,
               filtered: bool) -> Corrections:
        if not variants:
            return NO_CORRECTIONS
        index = self.index
        # Prefix ranges of a sorted vocabulary nest or are disjoint; give every position the best
        # error weight of the ranges holding it, in sorted-position space.
        weight = np.full(index.size, -np.inf)
        for p, lp in sorted(variants.items(), key=lambda item: item[1]):
            lo, hi = index.prefix_range(p)
            weight[lo:hi] = np.maximum(weight[lo:hi], lp)
        flo, fhi = index.prefix_range(fragment)
        weight[flo:fhi] = -np.inf  # the fragment's own matches are not corrections
        positions = np.flatnonzero(weight > -np.inf)
        ids = index.sorted_ids[positions]
        allowed = index.eligible(filtered)[0][ids]
        ids, positions = ids[allowed], positions[allowed]
        scores = np.asarray(row, dtype=np.float64)[ids] + weight[positions]
        finite = np.isfinite(scores)
        if not finite.all():
            ids, scores = ids[finite], scores[finite]
        if ids.size == 0:
            return NO_CORRECTIONS
        top = float(scores.max())
        log_total = top + math.log(float(np.exp(scores - top).sum()))
        if ids.size > k:
            part = np.argpartition(-scores, k - 1)[:k]
            ids, scores = ids[part], scores[part]
        best = np.lexsort((ids, -scores))
        return Corrections(ids[best], scores[best], log_total)


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


def explain(typed: str, intended: str) -> list[str]:
    """The kinds of single error that turn ``intended`` into ``typed`` (empty if none does)."""
    kinds: list[str] = []
    n, m = len(typed), len(intended)
    i = 0
    while i < min(n, m) and typed[i] == intended[i]:
        i += 1
    if typed == intended:
        return kinds
    if n == m:
        if typed[i + 1:] == intended[i + 1:]:
            kinds.append("substitute_adjacent" if _adjacent(intended[i], typed[i]) else "substitute")
        swapped = i + 1 < n and typed[i] == intended[i + 1] and typed[i + 1] == intended[i]
        if swapped and typed[i + 2:] == intended[i + 2:]:
            kinds.append("transpose")
    elif m == n + 1 and typed[i:] == intended[i + 1:]:
        c = intended[i]
        # Left out: the first of a run of the same letter may be any of them ("ocur"/"occur").
        doubled = (i and intended[i - 1] == c) or (i + 1 < m and intended[i + 1] == c)
        kinds.append("omit_double" if doubled else "omit")
    elif n == m + 1 and typed[i + 1:] == intended[i:]:
        x = typed[i]
        if (i and typed[i - 1] == x) or (i + 1 < n and typed[i + 1] == x):
            kinds.append("double")
        elif (i and _adjacent(typed[i - 1], x)) or (i + 1 < n and _adjacent(typed[i + 1], x)):
            kinds.append("insert_adjacent")
        else:
            kinds.append("insert")
    return kinds
