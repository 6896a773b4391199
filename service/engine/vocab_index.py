"""Vectorised word selection over a model's vocabulary: top-k with prefix completion.

Built once per model version. The vocabulary sorted as strings makes "every word starting with
``prefix``" a contiguous range found by two bisections, so a request never loops over the
vocabulary in Python; the rest (masking specials, renormalising, top-k) is numpy.

Selection reads a next-word row *ranked*: rearranged once into that sorted order
(:meth:`VocabIndex.arrange`), so a prefix's words are one contiguous slice of it. A session's
keystrokes inside a word all select from the same row (the keystroke cache keeps it ranked), and
a slice reads a few cache lines where gathering the range's words by id reads one line per word,
spread over the whole row.
"""

from __future__ import annotations

import bisect
import functools
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nextword.vocab import Vocab

# Prefix ranges up to this many words are sorted whole (measured: 9 vs 20 µs of CPU at 57 words,
# 12 vs 22 µs at 187, break-even near 400; the 889 words of "t" are faster through the shortlist).
SORT_WHOLE_RANGE = 256
PREFIX_RANGES = 65_536  # prefix ranges memoised per index (~200 bytes each)


@dataclass(frozen=True)
class TopK:
    """The chosen word ids, best first, with their log-probabilities.

    ``log_probs`` are renormalised over the words matching the prefix when there is one (they
    then sum to 1 over all matches), else the model's own log-probabilities. ``mass`` is the
    model probability of all eligible words (matching the prefix, never ``<unk>``/``<eos>``)."""

    ids: np.ndarray
    log_probs: np.ndarray
    mass: float
    matches: int


class VocabIndex:
    """``blocked``: ids of words never offered when a selection is ``filtered`` (the blocklist);
    ``blocked_words``: the whole list, for words outside the vocabulary (a text's new words);
    ``<unk>``/``<eos>`` are never offered at all."""

    def __init__(self, vocab: Vocab, blocked: Iterable[int] = (), blocked_words: frozenset[str] = frozenset()) -> None:
        self.vocab = vocab
        self.size = len(vocab)
        order = sorted(range(self.size), key=vocab.itos.__getitem__)
        self.sorted_words: list[str] = [vocab.itos[i] for i in order]
        self.sorted_ids = np.asarray(order, dtype=np.int64)
        self.banned = np.asarray([vocab.unk_id, vocab.eos_id], dtype=np.int64)
        self.allowed = np.ones(self.size, dtype=bool)
        self.allowed[self.banned] = False
        self.blocked = np.asarray(sorted(set(blocked) - set(self.banned.tolist())), dtype=np.int64)
        self.banned_filtered = np.concatenate([self.banned, self.blocked])
        self.allowed_filtered = self.allowed.copy()
        self.allowed_filtered[self.blocked] = False
        self.blocked_words = blocked_words | frozenset(vocab.itos[i] for i in self.blocked.tolist())
        self.words = np.asarray(vocab.itos, dtype=object)
        # The same masks by position in sorted order, with running counts: how many eligible
        # words a prefix's range holds is two look-ups.
        self._at: dict[bool, tuple[np.ndarray, list[int], np.ndarray]] = {}
        for filtered in (False, True):
            allowed_at = self.eligible(filtered)[0][self.sorted_ids]
            before = np.concatenate([[0], np.cumsum(allowed_at, dtype=np.int64)])
            self._at[filtered] = (allowed_at, before.tolist(), np.flatnonzero(~allowed_at))
        # Keystrokes ask for the same few thousand fragments over and over: two bisections over
        # the sorted words (some 30 string comparisons) become one dictionary look-up.
        self._ranges = functools.lru_cache(maxsize=PREFIX_RANGES)(self._bisect)

    def eligible(self, filtered: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(allowed mask, banned ids)`` of a selection with or without the blocklist."""
        return (self.allowed_filtered, self.banned_filtered) if filtered else (self.allowed, self.banned)

    def eligible_at(self, filtered: bool) -> np.ndarray:
        """The allowed mask of :meth:`eligible` by position in sorted order."""
        return self._at[filtered][0]

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        """``[lo, hi)`` in sorted order of the words starting with ``prefix``."""
        return self._ranges(prefix)

    def _bisect(self, prefix: str) -> tuple[int, int]:
        """:meth:`prefix_range` by bisection. Every word starting with ``prefix`` lies between
        ``prefix`` and ``prefix`` with its last character bumped by one code point, and every
        word in that interval starts with ``prefix``."""
        if not prefix:
            return 0, self.size
        lo = bisect.bisect_left(self.sorted_words, prefix)
        last = ord(prefix[-1])
        if last >= sys.maxunicode:
            hi = self.size
        else:
            hi = bisect.bisect_left(self.sorted_words, prefix[:-1] + chr(last + 1), lo)
        return lo, hi

    def candidates(self, prefix: str, filtered: bool = False) -> np.ndarray:
        """Ids of the words starting with ``prefix`` (never ``<unk>``/``<eos>``; never a blocked
        word when ``filtered``)."""
        lo, hi = self.prefix_range(prefix)
        ids = self.sorted_ids[lo:hi]
        return ids[self.eligible(filtered)[0][ids]]

    def arrange(self, log_probs: np.ndarray) -> np.ndarray:
        """A next-word row (by word id) ranked: rearranged into sorted-word order, a new array."""
        return np.asarray(log_probs)[self.sorted_ids]

    def top_k(self, log_probs: np.ndarray, k: int, prefix: str = "", filtered: bool = False) -> TopK:
        """The ``k`` most likely eligible words given one row of next-word log-probabilities (by
        word id; :meth:`top_k_ranked` for a row already ranked)."""
        return self.top_k_ranked(self.arrange(log_probs), k, prefix, filtered)

    def top_k_ranked(self, ranked: np.ndarray, k: int, prefix: str = "", filtered: bool = False) -> TopK:
        """:meth:`top_k` of a ranked row (:meth:`arrange`)."""
        allowed_at, before, banned_at = self._at[filtered]
        if prefix:
            lo, hi = self.prefix_range(prefix)
            matches = before[hi] - before[lo]
            if matches == hi - lo:  # every word of the range is eligible: a slice, no copy
                ids: np.ndarray | None = self.sorted_ids[lo:hi]
                wide = ranked[lo:hi].astype(np.float32, copy=False)
            else:
                positions = np.flatnonzero(allowed_at[lo:hi]) + lo
                ids, wide = self.sorted_ids[positions], ranked[positions].astype(np.float32, copy=False)
        else:
            ids, matches = None, self.size - banned_at.size
        if matches == 0 or k <= 0:
            return TopK(np.empty(0, np.int64), np.empty(0, np.float64), 0.0, matches)
        # float32 throughout (the model's own precision): the shift by the eligible maximum keeps
        # one term at exactly 1, so nothing that matters underflows, and the pairwise sum is good
        # to ~1e-7 relative. Half the memory traffic of float64 over a vocabulary-sized row.
        if ids is None:
            wide = ranked.astype(np.float32)  # a copy: the ranked row is shared
            wide[banned_at] = -np.inf
        # (ufunc reductions called directly: ndarray.max/sum go through a Python wrapper, and a
        # keystroke's range is small enough for that to show)
        top = float(np.maximum.reduce(wide))
        finite = math.isfinite(top)
        if not finite:
            top = 0.0 if math.isnan(top) or top > 0 else -1e30
        shifted = wide - np.float32(top)
        log_mass = top + math.log(float(np.add.reduce(np.exp(shifted, out=shifted), dtype=np.float64)))
        k = min(k, matches)
        # Best first, ties by word id: the result never depends on partitioning order.
        if ids is not None and matches <= SORT_WHOLE_RANGE and finite:
            # A short prefix range (most keystrokes past the first letter): sorting it whole
            # costs less than the few numpy calls that shortlist it.
            pos = np.lexsort((ids, -wide))[:k]
        else:
            pos = _shortlist(wide, k)
            if ids is None:
                pos = pos[allowed_at[pos]]
            keys = (ids if ids is not None else self.sorted_ids)[pos]
            pos = pos[np.lexsort((keys, -wide[pos]))[:k]]
        chosen = wide[pos].astype(np.float64)
        if prefix:
            chosen = chosen - log_mass
        result_ids = (ids if ids is not None else self.sorted_ids)[pos].astype(np.int64)
        return TopK(result_ids, chosen, math.exp(log_mass), matches)

    def decode(self, ids: np.ndarray) -> list[str]:
        return self.words[ids].tolist()


def _shortlist(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of every score >= some threshold that the k-th best score is known to reach.

    A full ``argpartition`` over a vocabulary-sized row costs ~0.2 ms; this costs a few tens of
    µs. Cut the row into blocks and take each block's maximum: the k-th largest of those maxima
    belongs to k distinct elements that are all at least as large, so the k-th best score (over
    elements not set to -inf) is at least that threshold, and so is every score tied with it.
    What passes is usually a few dozen positions, which the caller sorts exactly."""
    n = scores.size
    block = max(1, n // max(4 * k, 64))
    blocks = n // block
    if blocks <= k:
        return np.arange(n)
    maxima = scores[: blocks * block].reshape(blocks, block).max(axis=1)
    threshold = np.partition(maxima, blocks - k)[blocks - k]
    if np.isnan(threshold):
        return np.flatnonzero(~np.isnan(scores))
    return np.flatnonzero(scores >= threshold)
