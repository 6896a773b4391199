"""Fit the cache language model's parameters (``service/engine/cache_lm.py``) on held-out text.

Each token of a split is scored by the model once (onnxruntime, state carried across the split as
in ``eval``); what the cache would add at each position depends only on the words, so every
candidate window, decay and smoothing is evaluated from precomputed pairs of equal words, and the
three mixture weights are found by Newton's method (the log-likelihood of a mixture is concave in
its weights). The result is checked against the service's own per-position code in ``eval``.

A document (one Brown file) is one writer's session: the cache starts empty at each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.engine.cache_lm import CacheParams

WINDOWS = (250, 500, 1000, 2000)
DECAYS = (1.0, 0.997, 0.995, 0.99)
KAPPAS = (0.05, 0.1, 0.25, 0.5)


def document_starts(lengths: Sequence[int]) -> np.ndarray:
    """Index in the stream of the first token of each document's tokens, for every token."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.repeat(np.cumsum(lengths) - lengths, lengths)


def _key(*columns: np.ndarray) -> np.ndarray:
    """One integer per distinct row of ``columns`` (equal rows, equal keys)."""
    return np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)[1].ravel()


def _pairs(keys: np.ndarray, valid: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """All (m, j), m < j, both ``valid``, with equal ``keys`` and j − m <= max_gap."""
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(keys[idx], kind="stable")]
    sorted_keys = keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    ms, js = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for group in np.split(order, cuts):
        if group.size > 1:
            a, b = np.triu_indices(group.size, 1)
            m, j = group[a], group[b]  # stable sort: positions ascend within a group
            near = j - m <= max_gap
            ms.append(m[near])
            js.append(j[near])
    return np.concatenate(ms), np.concatenate(js)


@dataclass
class _Level:
    num_j: np.ndarray  # target position j of a pair whose word and context match
    num_gap: np.ndarray
    den_j: np.ndarray  # target position j of a pair whose context matches
    den_gap: np.ndarray


class CacheFitter:
    """Everything needed to score a parameter set on one split in a few milliseconds.

    ``ids``: the split's token ids as one stream; ``lengths``: its documents' lengths;
    ``model_log_probs[i]``: the model's log-probability of ``ids[i + 1]``."""

    def __init__(self, ids: np.ndarray, lengths: Sequence[int], model_log_probs: np.ndarray,
                 max_window: int = max(WINDOWS)) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.n = ids.size
        if model_log_probs.size != self.n - 1:
            raise ValueError("model_log_probs must score every token after the first")
        self.p_model = np.exp(model_log_probs.astype(np.float64))
        starts = document_starts(lengths)
        self.seen = np.arange(self.n) - starts  # words of the document before each token
        prev = np.concatenate([[-1], ids[:-1]])
        prev2 = np.concatenate([[-1, -1], ids[:-2]])
        everywhere = np.ones(self.n, dtype=bool)
        um, uj = _pairs(_key(starts, ids), everywhere, max_window)
        self.uni = _Level(uj, uj - um, np.empty(0, np.int64), np.empty(0, np.int64))
        levels = []
        for context, valid in (((prev,), self.seen >= 1), ((prev2, prev), self.seen >= 2)):
            nm, nj = _pairs(_key(starts, *context, ids), valid, max_window)
            dm, dj = _pairs(_key(starts, *context), valid, max_window)
            levels.append(_Level(nj, nj - nm, dj, dj - dm))
        self.bi, self.tri = levels

    def _sum(self, j: np.ndarray, gap: np.ndarray, window: int, decay: float) -> np.ndarray:
        near = gap <= window
        weights = np.power(decay, gap[near] - 1.0)
        return np.bincount(j[near], weights=weights, minlength=self.n)[1:].astype(np.float64)

    def components(self, window: int, decay: float, kappa: float) -> tuple[np.ndarray, np.ndarray]:
        """Per scored position: the multipliers ``c_k`` of the three weights (``p`` takes
        ``λ_k·c_k`` from the model) and the components' probabilities of the target."""
        seen = np.minimum(self.seen[1:], window).astype(np.float64)
        den_u = seen if decay == 1.0 else (1.0 - np.power(decay, seen)) / (1.0 - decay)
        num_u = self._sum(self.uni.num_j, self.uni.num_gap, window, decay)
        mult, prob = [(den_u > 0).astype(np.float64)], [np.divide(num_u, den_u, out=np.zeros_like(num_u),
                                                                  where=den_u > 0)]
        for level in (self.bi, self.tri):
            num = self._sum(level.num_j, level.num_gap, window, decay)
            den = self._sum(level.den_j, level.den_gap, window, decay)
            mult.append(den / (den + kappa) if kappa > 0 else (den > 0).astype(np.float64))
            prob.append(np.divide(num, den, out=np.zeros_like(num), where=den > 0))
        return np.stack(mult), np.stack(prob)

    def perplexity(self, params: CacheParams | None) -> float:
        if params is None:
            return math.exp(-float(np.log(self.p_model).mean()))
        mult, prob = self.components(params.window, params.decay, params.kappa)
        lam = np.asarray(params.weights)[:, None]
        q = self.p_model + (lam * mult * (prob - self.p_model)).sum(0)
        return math.exp(-float(np.log(q).mean()))

    def best_weights(self, window: int, decay: float, kappa: float) -> tuple[tuple[float, float, float], float]:
        """The weights maximising the likelihood (Newton, kept inside the simplex), and the perplexity."""
        mult, prob = self.components(window, decay, kappa)
        g = mult * (prob - self.p_model)  # q = p_model + λ·g
        lam = np.full(3, 0.05)
        for _ in range(30):
            q = self.p_model + lam @ g
            r = g / q
            grad = r.mean(1)
            hess = -(r @ r.T) / r.shape[1]
            try:
                step = np.linalg.solve(hess - 1e-9 * np.eye(3), -grad)
            except np.linalg.LinAlgError:
                step = grad * 0.01
            # halve the step until it stays feasible (λ >= 0, Σλ < 1) and does not lose likelihood
            f0 = float(np.log(q).mean())
            t = 1.0
            while t > 1e-6:
                cand = np.clip(lam + t * step, 0.0, None)
                q_new = self.p_model + cand @ g
                if cand.sum() < 0.95 and np.all(q_new > 0) and float(np.log(q_new).mean()) >= f0 - 1e-12:
                    break
                t /= 2
            else:
                break
            done = np.abs(cand - lam).max() < 1e-6
            lam = cand
            if done:
                break
        ppl = math.exp(-float(np.log(self.p_model + lam @ g).mean()))
        return (float(lam[0]), float(lam[1]), float(lam[2])), ppl

    def fit(self, windows: Sequence[int] = WINDOWS, decays: Sequence[float] = DECAYS,
            kappas: Sequence[float] = KAPPAS) -> tuple[CacheParams, list[dict]]:
        """The best parameters over the grid (weights fitted for each point), and per window its
        best perplexity (the trade-off of window against session bytes)."""
        table: list[dict] = []
        best: tuple[float, CacheParams] | None = None
        for window in windows:
            row: tuple[float, CacheParams] | None = None
            for decay in decays:
                for kappa in kappas:
                    weights, ppl = self.best_weights(window, decay, kappa)
                    params = CacheParams(window, decay, weights, kappa)
                    if row is None or ppl < row[0]:
                        row = (ppl, params)
            assert row is not None
            table.append({"window": window, "ppl": row[0], **row[1].to_dict()})
            if best is None or row[0] < best[0]:
                best = row
        assert best is not None
        return best[1], table


def fit_cache(model_dir: str | Path, corpus: str | Path, corpus_format: str, split: str,
              windows: Sequence[int], threads: int | None = None, command: str | None = None) -> CacheParams:
    """``nextword-train fit-cache``: score ``split`` with the model, fit the cache on it (one row
    per window printed), and store the parameters with how they were fitted (and ``command``, when
    given) in the cache section of the model's model.json."""
    from nextword import artifact as A
    from training.data import split_documents
    from training.evaluate import load_artifact, score_stream

    _, vocab = load_artifact(model_dir)
    docs = split_documents(corpus, corpus_format, split)
    words = [w for d in docs for w in d]
    lp, _ = score_stream(model_dir, words, threads=threads)
    fitter = CacheFitter(np.asarray(vocab.encode(words)), [len(d) for d in docs], lp, max(windows))
    params, table = fitter.fit(windows)
    without = fitter.perplexity(None)
    best = fitter.perplexity(params)
    for row in table:
        print(f"window {row['window']:>5}: {split} ppl {row['ppl']:.2f} (decay {row['decay']}, "
              f"kappa {row['kappa']}, weights {', '.join(f'{w:.3f}' for w in row['weights'])})")
    print(f"{split} ppl {without:.2f} -> {best:.2f} with the cache ({100 * (1 - best / without):.1f}% lower)")
    card = A.read_card(model_dir)
    card.cache = {
        **params.to_dict(),
        "fitted": {"split": split, "corpus": card.training.get("protocol") or corpus_format,
                   "documents": len(docs), "ppl_without": without, "ppl": best,
                   "windows": [{"window": r["window"], "ppl": r["ppl"]} for r in table]},
    }
    if command is not None:
        card.cache["command"] = command
    A.write_card(model_dir, card)
    print(f"wrote the cache section of {Path(model_dir) / 'model.json'}")
    return params
