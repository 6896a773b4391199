"""Tests of the modified Kneser-Ney baseline: against an independent dict-based implementation
(so the vectorised CSR/batched code is checked against the textbook recursion), normalisation,
a hand-worked bigram case, and a quick run on the real Brown corpus when it is available."""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from training.ngram import KneserNey

BROWN = Path(__file__).parents[2] / "shared/data/brown"


# ---------------------------------------------------------------- independent reference


class NaiveKN:
    """Interpolated modified KN written directly from Chen & Goodman with tuples and dicts.

    Deliberately shares no code with ``training.ngram``: recursion over levels instead of the
    factorised dense/sparse form, explicit n-gram tuples instead of interned int64 keys.
    """

    BOS = "<stream-start>"

    def __init__(self, tokens: list[int], vocab_size: int, order: int) -> None:
        self.v, self.order = vocab_size, order
        self.followers: dict[int, dict[tuple, dict[int, int]]] = {}
        self.disc: dict[int, tuple[float, float, float]] = {}
        for k in range(1, order + 1):
            grams = [tuple(tokens[i - k + 1 : i + 1]) for i in range(k - 1, len(tokens))]
            if k == order:
                adjusted = Counter(grams)
            else:  # continuation count: distinct left neighbours (stream start is one of them)
                left: dict[tuple, set] = defaultdict(set)
                for i in range(k - 1, len(tokens)):
                    left[tuple(tokens[i - k + 1 : i + 1])].add(tokens[i - k] if i - k >= 0 else self.BOS)
                adjusted = Counter({g: len(s) for g, s in left.items()})
            nr = [sum(1 for c in adjusted.values() if c == r) for r in (1, 2, 3, 4)]
            self.disc[k] = self._discounts(*nr)
            table: dict[tuple, dict[int, int]] = defaultdict(dict)
            for g, c in adjusted.items():
                table[g[:-1]][g[-1]] = c
            self.followers[k] = table

    @staticmethod
    def _discounts(n1: int, n2: int, n3: int, n4: int) -> tuple[float, float, float]:
        if 0 in (n1, n2, n3, n4):
            return 0.5, 1.0, 1.5  # closed form undefined: KenLM-style fallback
        y = n1 / (n1 + 2 * n2)
        d1, d2, d3 = 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3
        if not (0 < d1 <= 1 and 0 < d2 <= 2 and 0 < d3 <= 3):
            return 0.5, 1.0, 1.5
        return d1, d2, d3

    def _d(self, k: int, c: int) -> float:
        return 0.0 if c == 0 else self.disc[k][min(c, 3) - 1]

    def prob(self, w: int, history: list[int]) -> float:
        k = min(self.order, len(history) + 1)
        return self._p(k, tuple(history[len(history) - (k - 1) :]) if k > 1 else (), w)

    def _p(self, k: int, h: tuple, w: int) -> float:
        if k == 0:
            return 1.0 / self.v
        f = self.followers[k].get(h)
        if not f:  # unseen context: this level adds nothing
            return self._p(k - 1, h[1:], w)
        total = sum(f.values())
        gamma = sum(self._d(k, c) for c in f.values()) / total
        c = f.get(w, 0)
        return (c - self._d(k, c)) / total + gamma * self._p(k - 1, h[1:], w)


def toy_corpus(n: int = 3000, vocab: int = 150, seed: int = 0) -> list[int]:
    """A sparse random Markov chain with Zipfian jumps: repetitive enough that n-gram counts of
    1..4+ occur at every order, with a long tail of rare words so the unigram level's continuation
    counts are small too (with seed 0 no level needs the fallback discounts)."""
    rng = np.random.default_rng(seed)
    succ = [rng.choice(vocab, size=3, replace=False) for _ in range(vocab)]
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    zipf /= zipf.sum()
    out = [0]
    for _ in range(n - 1):
        jump = rng.random() < 0.3
        out.append(int(rng.choice(vocab, p=zipf) if jump else rng.choice(succ[out[-1]], p=[0.6, 0.3, 0.1])))
    return out


def contexts(tokens: list[int], vocab_size: int, seed: int = 1, n: int = 40) -> list[list[int]]:
    """Seen contexts of every length, unseen random ones, one with a never-seen word, the empty one."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[]]
    for length in (1, 2, 3, 4, 6):
        for start in rng.integers(0, len(tokens) - length, size=n // 5):
            out.append(tokens[start : start + length])
        out.append(rng.integers(0, vocab_size, size=length).tolist())
    out.append([tokens[5], tokens[6], vocab_size - 1])
    out.append([vocab_size - 1, tokens[5], tokens[6]])
    return out


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("order", [2, 3, 5])
def test_matches_naive_implementation(order: int) -> None:
    tokens = toy_corpus()
    vocab_size = 152  # ids 150 and 151 never occur: only the uniform term gives them mass
    model = KneserNey(order).fit(tokens, vocab_size)
    naive = NaiveKN(tokens, vocab_size, order)
    for k in range(1, order + 1):
        assert model.discounts[k - 1] == pytest.approx(naive.disc[k], abs=1e-12)
    for k in range(1, order + 1):  # the toy corpus exercises the closed form, not the fallback
        assert all(0 < d < r for r, d in zip((1, 2, 3), naive.disc[k], strict=True)), naive.disc[k]
    for ctx in contexts(tokens, vocab_size):
        dist = model.distribution(ctx)
        expected = np.array([naive.prob(w, ctx) for w in range(vocab_size)])
        np.testing.assert_allclose(dist, expected, rtol=0, atol=1e-9, err_msg=f"context {ctx}")


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_distributions_sum_to_one_and_are_positive(order: int) -> None:
    tokens = toy_corpus(n=1500, vocab=18, seed=3)  # small vocabulary: some levels use the fallback
    model = KneserNey(order).fit(tokens, 20)
    for ctx in contexts(tokens, 20, seed=4):
        dist = model.distribution(ctx)
        assert dist.dtype == np.float64 and dist.shape == (20,)
        assert dist.sum() == pytest.approx(1.0, abs=1e-12)
        assert (dist > 0).all()


def test_hand_checked_bigram() -> None:
    # ids a=0 b=1 c=2 d=3, e=4 never seen; stream "a b a b a b a b a c a c a c d", order 2.
    # Bigram (top level, raw counts): ab=4 ba=4 ac=3 ca=2 cd=1 -> n1=1 n2=1 n3=1 n4=2,
    #   Y = 1/(1+2*1) = 1/3, D1 = 1-2Y*1/1 = 1/3, D2 = 2-3Y*1/1 = 1, D3+ = 3-4Y*2/1 = 1/3.
    # Unigram (continuation counts): a has left neighbours {start, b, c} -> 3, b {a} -> 1,
    #   c {a} -> 1, d {c} -> 1, e -> 0: n2 = 0, so the fallback D = (0.5, 1, 1.5) applies.
    #   S = 6, gamma = (1.5 + 3*0.5)/6 = 1/2, uniform share 1/2 * 1/5 = 1/10:
    #   p1(a) = 1.5/6 + 1/10 = 21/60, p1(b) = p1(c) = p1(d) = 0.5/6 + 1/10 = 11/60, p1(e) = 6/60.
    # After "a": followers b=4, c=3, S=7; gamma = (D3+ + D3+)/7 = (2/3)/7 = 2/21.
    #   p(b|a) = (4-1/3)/7 + 2/21 * 11/60 = 330/630 + 11/630 = 341/630
    #   p(c|a) = (3-1/3)/7 + 11/630 = 251/630, p(a|a) = 2/21 * 21/60 = 21/630,
    #   p(d|a) = 11/630, p(e|a) = 2/21 * 1/10 = 6/630; total 630/630.
    # After "c": followers a=2, d=1, S=3; gamma = (D2 + D1)/3 = (4/3)/3 = 4/9.
    #   p(a|c) = (2-1)/3 + 4/9 * 21/60 = 180/540 + 84/540 = 264/540,
    #   p(d|c) = (1-1/3)/3 + 4/9 * 11/60 = 120/540 + 44/540 = 164/540,
    #   p(b|c) = p(c|c) = 44/540, p(e|c) = 4/9 * 1/10 = 24/540; total 540/540.
    # After "b": follower a=4, S=4, gamma = (1/3)/4 = 1/12: p(a|b) = (11/3)/4 + 1/12 * 21/60 = 681/720.
    a, b, c, d = 0, 1, 2, 3
    stream = [a, b, a, b, a, b, a, b, a, c, a, c, a, c, d]
    model = KneserNey(2).fit(stream, 5)
    assert model.discounts[1] == pytest.approx((1 / 3, 1.0, 1 / 3))
    assert model.discounts[0] == pytest.approx((0.5, 1.0, 1.5))
    np.testing.assert_allclose(model.distribution([]), np.array([21, 11, 11, 11, 6]) / 60, atol=1e-15)
    np.testing.assert_allclose(model.distribution([a]), np.array([21, 341, 251, 11, 6]) / 630, atol=1e-15)
    np.testing.assert_allclose(model.distribution([c]), np.array([264, 44, 44, 164, 24]) / 540, atol=1e-15)
    assert model.distribution([b])[a] == pytest.approx(681 / 720, abs=1e-15)
    # evaluate scores b|a (rank 0), a|b (rank 0) and c|a (rank 1, behind b)
    res = model.evaluate([a, b, a, c])
    assert res["tokens"] == 3
    assert res["nll"] == pytest.approx(-(math.log(341 / 630) + math.log(681 / 720) + math.log(251 / 630)) / 3)
    assert res["top1"] == pytest.approx(2 / 3)
    assert res["top3"] == 1.0


def test_evaluate_matches_per_position_distributions() -> None:
    tokens = toy_corpus(vocab=14, seed=5)
    train, test = tokens[:2500], tokens[2500:] + [15, 14, 0, 1]
    model = KneserNey(4).fit(train, 16)
    logp, ranks = [], []
    for i in range(1, len(test)):
        dist = model.distribution(test[:i])
        logp.append(math.log(dist[test[i]]))
        ranks.append(int((dist > dist[test[i]]).sum()))
    nll = -sum(logp) / len(logp)
    for batch in (1, 7, 256):
        res = model.evaluate(test, batch_size=batch)
        assert res["tokens"] == len(test) - 1
        assert res["nll"] == pytest.approx(nll, rel=1e-12)
        for k in (1, 3, 5):
            assert res[f"top{k}"] == pytest.approx(sum(r < k for r in ranks) / len(ranks))
    assert model.evaluate(test, max_tokens=10)["tokens"] == 10


def test_rejects_out_of_range_ids() -> None:
    model = KneserNey(3).fit([0, 1, 2, 1, 0], 3)
    with pytest.raises(ValueError):
        model.distribution([5])
    with pytest.raises(ValueError):
        KneserNey(3).fit([0, 3], 3)


@pytest.mark.skipif(not BROWN.is_dir(), reason=f"Brown corpus not found at {BROWN}")
def test_brown_order3_smoke() -> None:
    from training.data import brown_lm, build_vocab

    start = time.time()
    splits = brown_lm(BROWN)
    vocab = build_vocab(splits.train, min_count=3)
    model = KneserNey(3).fit(vocab.encode(splits.train), len(vocab))
    res = model.evaluate(vocab.encode(splits.test), max_tokens=2000)
    assert res["tokens"] == 2000
    assert math.isfinite(res["ppl"]) and 80 < res["ppl"] < 600, res
    assert 0.05 < res["top1"] < res["top3"] < res["top5"] < 0.8, res
    np.testing.assert_allclose(model.distribution(vocab.encode(["of", "the"])).sum(), 1.0, atol=1e-12)
    assert time.time() - start < 60
