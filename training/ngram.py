"""Interpolated modified Kneser-Ney n-gram language model (Chen & Goodman 1998), the count-based
baseline the recurrent models are compared against.

Why it is built the way it is:

* It reads the *same* id stream as the neural models (contexts run across ``<eos>``, ``<unk>`` is an
  ordinary word) and is scored by the same :class:`~training.metrics.StreamMetrics` code path, so
  its perplexity and top-k numbers are directly comparable with theirs.
* Top-k accuracy needs the rank of the target among *all* words, so the model must produce the
  full next-word distribution, not just the target's probability. Interpolated KN factorises::

      p(w | h_m) = W_1 * p_1(w) + sum_{k=2..m} W_k * alpha_k(h_k, w)
      W_k        = prod_{j=k+1..m} gamma_j(h_j)                (W_m = 1)

  where ``h_k`` is the (k-1)-word context of level ``k``, ``alpha_k`` the discounted count term
  (non-zero only for words seen after ``h_k``) and ``gamma_k`` the back-off weight. This is the
  same as "start from the unigram vector, then for every higher level scale by gamma and add the
  sparse discounted counts", but needs only one dense pass per position, and it batches: a block of
  positions becomes one dense ``(B, V)`` matrix plus one scatter-add of every sparse term.
* n-grams are interned level by level as ``parent_id * V + word`` int64 keys (the parent is the
  (k-1)-gram prefix). Sorted keys then group every level's n-grams by context, which gives the
  CSR-style ``indptr`` arrays for free, and lookups of test contexts are one ``searchsorted`` per
  level for the whole stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from training.data import build_vocab, load_corpus
from training.metrics import StreamMetrics

FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


def modified_kn_discounts(adjusted_counts: np.ndarray) -> tuple[float, float, float]:
    """Chen & Goodman's D1, D2, D3+ from the count-of-counts n1..n4 of one level.

    The closed form needs n1..n4 > 0; on natural text it then gives 0 < D_r < r. On degenerate
    (tiny or synthetic) data it can be undefined or leave (0, r]; a zero discount would leave a
    level no back-off mass, and at the unigram level that gives unseen words probability 0. So,
    like KenLM's ``--discount_fallback``, the whole level then uses the fixed (0.5, 1, 1.5).
    """
    a = np.asarray(adjusted_counts)
    n1, n2, n3, n4 = (float(np.count_nonzero(a == r)) for r in (1, 2, 3, 4))
    if min(n1, n2, n3, n4) == 0:
        return FALLBACK_DISCOUNTS
    y = n1 / (n1 + 2.0 * n2)
    d = (1.0 - 2.0 * y * n2 / n1, 2.0 - 3.0 * y * n3 / n2, 3.0 - 4.0 * y * n4 / n3)
    if not all(0.0 < dr <= r for r, dr in zip((1, 2, 3), d, strict=True)):
        return FALLBACK_DISCOUNTS
    return float(d[0]), float(d[1]), float(d[2])


def _discount(counts: np.ndarray, d: tuple[float, float, float]) -> np.ndarray:
    """D(c) per count: 0 for c == 0 (words never seen keep no mass to give away)."""
    table = np.array([0.0, d[0], d[1], d[2]])
    return table[np.minimum(counts, 3)]


def _expand_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    offsets = np.repeat(starts - (ends - lengths), lengths)
    return offsets + np.arange(total, dtype=np.int64)


@dataclass
class _Level:
    """One interpolation level k: n-grams of length k grouped by their (k-1)-word context.

    Context ids are n-gram ids of level k-1 (level 1 has the single empty context 0).
    """

    keys: np.ndarray  # sorted int64 keys parent_id * V + word; index = n-gram id of this level
    words: np.ndarray  # last word of each n-gram
    indptr: np.ndarray  # n-grams of context c are ids indptr[c]:indptr[c + 1]
    alpha: np.ndarray  # (a - D(a)) / S(context) per n-gram
    gamma: np.ndarray  # back-off weight per context; 1.0 where the context was never followed
    seen: np.ndarray  # bool per context: S(context) > 0, i.e. this level contributes
    discounts: tuple[float, float, float]


class KneserNey:
    """Interpolated modified Kneser-Ney LM of a given order over a fixed vocabulary of ids.

    The highest level uses raw counts; every lower level uses continuation counts N1+(. x), the
    number of distinct words seen before ``x``, because a lower level is only consulted in the
    back-off mass, i.e. for how likely a word is in *new* contexts. The stream start counts as one
    extra distinct predecessor so that every n-gram seen in training keeps a positive count.
    Level 1 is interpolated with the uniform distribution so that no word, even one never seen in
    training, gets probability zero (an infinite perplexity would make the baseline useless).

    At the start of a stream (history shorter than order - 1) the highest level that fits the
    history is used, exactly as the neural model sees a shorter history there.
    """

    def __init__(self, order: int = 5) -> None:
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order = order
        self.vocab_size = 0
        self.levels: list[_Level] = []
        self.unigram = np.zeros(0)

    # ------------------------------------------------------------------ fitting

    def fit(self, ids: Sequence[int], vocab_size: int) -> KneserNey:
        """Count every n-gram of ``ids`` read as one continuous stream and precompute the model."""
        x = np.asarray(ids, dtype=np.int64)
        v = int(vocab_size)
        if x.ndim != 1 or x.size == 0:
            raise ValueError("ids must be a non-empty 1-D sequence")
        if x.min() < 0 or x.max() >= v:
            raise ValueError(f"ids must lie in [0, {v})")
        self.vocab_size = v
        n_tok = x.size

        # gram[k][j]: id of the k-gram ending at position j (-1 where it does not fit); level-1 ids
        # are the word ids themselves so the unigram level covers the whole vocabulary.
        grams: list[np.ndarray] = [np.zeros(0, dtype=np.int64), x]
        keys: list[np.ndarray] = [np.zeros(1, dtype=np.int64), np.arange(v, dtype=np.int64)]
        raw: list[np.ndarray] = [np.zeros(0, dtype=np.int64), np.bincount(x, minlength=v)]
        for k in range(2, self.order + 1):
            g = np.full(n_tok, -1, dtype=np.int64)
            if n_tok >= k:
                key = grams[k - 1][k - 2 : -1] * v + x[k - 1 :]
                uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
                g[k - 1 :] = inverse
            else:
                uniq, counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
            grams.append(g)
            keys.append(uniq)
            raw.append(counts)

        self.levels = []
        for k in range(1, self.order + 1):
            if k == self.order:
                adjusted = raw[k]
            else:
                adjusted = self._continuation_counts(grams, keys, k)
            n_ctx = 1 if k == 1 else keys[k - 1].size
            parents = keys[k] // v
            indptr = np.searchsorted(keys[k], np.arange(n_ctx + 1, dtype=np.int64) * v)
            d = modified_kn_discounts(adjusted[adjusted > 0])
            disc = _discount(adjusted, d)
            total = np.bincount(parents, weights=adjusted.astype(np.float64), minlength=n_ctx)
            seen = total > 0
            safe = np.where(seen, total, 1.0)
            alpha = (adjusted - disc) / safe[parents]
            gamma = np.where(seen, np.bincount(parents, weights=disc, minlength=n_ctx) / safe, 1.0)
            self.levels.append(_Level(keys[k], keys[k] % v, indptr, alpha, gamma, seen, d))

        lvl1 = self.levels[0]
        gamma1 = lvl1.gamma[0] if lvl1.seen[0] else 1.0
        self.unigram = lvl1.alpha + gamma1 / v
        return self

    def _continuation_counts(self, grams: list[np.ndarray], keys: list[np.ndarray], k: int) -> np.ndarray:
        """N1+(. x) for every k-gram x: distinct (k+1)-grams ending in x, plus the stream start."""
        upper = grams[k + 1]
        valid = np.flatnonzero(upper >= 0)
        _, first = np.unique(upper[valid], return_index=True)
        suffix = grams[k][valid[first]]
        counts = np.bincount(suffix, minlength=keys[k].size)
        if grams[k].size >= k:
            counts[grams[k][k - 1]] += 1  # the first k-gram of the stream has no word before it
        return counts

    @property
    def discounts(self) -> list[tuple[float, float, float]]:
        """(D1, D2, D3+) per level, level 1 (unigram) first."""
        return [lvl.discounts for lvl in self.levels]

    # ------------------------------------------------------------------ querying

    def _stream_contexts(self, ids: np.ndarray) -> np.ndarray:
        """``(len(ids), order + 1)`` context ids: row i, column k is the id of the (k-1)-word context
        that level k uses to predict ``ids[i]`` from ``ids[:i]`` (-1: no such training n-gram).

        Column 1 is the empty context (0), column 0 is unused. One ``searchsorted`` per level for
        the whole stream, reusing the previous level's ids, because keys are ``parent_id * V + word``.
        """
        n, v = ids.size, self.vocab_size
        ctx = np.full((n, self.order + 1), -1, dtype=np.int64)
        ctx[:, 1] = 0
        gram = ids  # gram[j]: id of the (k-1)-gram ending at position j; level-1 ids are word ids
        for k in range(2, self.order + 1):
            ctx[1:, k] = gram[:-1]  # the (k-1)-gram ending at i - 1 is the context of position i
            if k == self.order:
                break
            keys = self.levels[k - 1].keys
            parent = gram[:-1]
            key = parent * v + ids[1:]
            pos = np.minimum(np.searchsorted(keys, key), max(keys.size - 1, 0))
            hit = (parent >= 0) & (keys[pos] == key) if keys.size else np.zeros(n - 1, dtype=bool)
            gram = np.concatenate([[-1], np.where(hit, pos, -1)]).astype(np.int64)
        return ctx

    def _distributions(self, ctx: np.ndarray) -> np.ndarray:
        """Dense ``(B, V)`` next-word distributions for rows of context ids (see module docstring)."""
        b, v = ctx.shape[0], self.vocab_size
        gammas = np.ones((b, self.order + 1))
        seen_at: list[np.ndarray] = [np.zeros(b, dtype=bool), np.zeros(b, dtype=bool)]
        for k in range(2, self.order + 1):
            lvl, c = self.levels[k - 1], ctx[:, k]
            ok = c >= 0
            ok[ok] = lvl.seen[c[ok]]
            seen_at.append(ok)
            gammas[ok, k] = lvl.gamma[c[ok]]
        # weight[:, k] = product of gammas of the levels above k
        weight = np.ones((b, self.order + 1))
        weight[:, : self.order] = np.cumprod(gammas[:, :0:-1], axis=1)[:, ::-1]
        probs = weight[:, 1:2] * self.unigram[None, :]
        flat_idx, flat_val = [], []
        for k in range(2, self.order + 1):
            rows = np.flatnonzero(seen_at[k])
            if rows.size == 0:
                continue
            lvl, c = self.levels[k - 1], ctx[rows, k]
            starts, lengths = lvl.indptr[c], lvl.indptr[c + 1] - lvl.indptr[c]
            idx = _expand_ranges(starts, lengths)
            rep = np.repeat(rows, lengths)
            flat_idx.append(rep * v + lvl.words[idx])
            flat_val.append(lvl.alpha[idx] * weight[rep, k])
        if flat_idx:
            probs += np.bincount(np.concatenate(flat_idx), weights=np.concatenate(flat_val), minlength=b * v).reshape(
                b, v
            )
        return probs

    def distribution(self, context: Sequence[int]) -> np.ndarray:
        """Full next-word distribution (float64, sums to 1) after ``context`` (only the last
        ``order - 1`` ids matter)."""
        self._check_fitted()
        hist = list(context)[-(self.order - 1) :] if self.order > 1 else []
        ids = np.asarray([*hist, 0], dtype=np.int64)
        self._check_ids(ids)
        return self._distributions(self._stream_contexts(ids)[-1:])[0]

    def evaluate(
        self,
        ids: Sequence[int],
        max_tokens: int | None = None,
        batch_size: int = 256,
        progress: bool = False,
        desc: str = "kn eval",
    ) -> dict[str, float]:
        """Score ``ids[1:]`` from their preceding history (the positions the neural evaluator
        scores) through :class:`StreamMetrics`; ``max_tokens`` limits the scored positions."""
        self._check_fitted()
        x = np.asarray(ids[: (max_tokens + 1) if max_tokens else None], dtype=np.int64)
        self._check_ids(x)
        if x.size < 2:
            raise ValueError("need at least two ids to score one position")
        ctx = self._stream_contexts(x)
        metrics = StreamMetrics()
        positions = np.arange(1, x.size)
        with tqdm(total=positions.size, desc=desc, disable=not progress, unit="tok") as bar:
            for start in range(0, positions.size, batch_size):
                pos = positions[start : start + batch_size]
                probs = self._distributions(ctx[pos])
                target = probs[np.arange(pos.size), x[pos]]
                ranks = (probs > target[:, None]).sum(axis=1)
                metrics.add(np.log(target), ranks)
                bar.update(pos.size)
        return metrics.result()

    def _check_fitted(self) -> None:
        if not self.levels:
            raise RuntimeError("call fit() first")

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size})")


def run_ngram(
    corpus: str,
    order: int = 5,
    fmt: str = "brown",
    min_count: int = 3,
    max_eval_tokens: int | None = None,
) -> dict:
    """Fit on the train split with the vocabulary the neural models use, score valid and test."""
    splits = load_corpus(corpus, fmt)
    vocab = build_vocab(splits.train, min_count=min_count)
    t0 = time.time()
    model = KneserNey(order).fit(vocab.encode(splits.train), len(vocab))
    fit_s = time.time() - t0
    out: dict = {
        "order": order,
        "vocab_size": len(vocab),
        "train_tokens": len(splits.train),
        "discounts": {f"order{k + 1}": list(d) for k, d in enumerate(model.discounts)},
        "fit_seconds": fit_s,
    }
    for name in ("valid", "test"):
        out[name] = model.evaluate(vocab.encode(getattr(splits, name)), max_eval_tokens, progress=True, desc=name)
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--format", default="brown")
    parser.add_argument("--min-count", type=int, default=3)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(run_ngram(args.corpus, args.order, args.format, args.min_count, args.max_eval_tokens), indent=2))
