"""Next-word metrics shared by every model evaluated here (neural and n-gram): one code path."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TOP_K = (1, 3, 5)


@dataclass
class StreamMetrics:
    """Accumulates, over every predicted position, the target's log-probability and its rank
    (how many words the model scored strictly higher; rank 0 means top-1 correct)."""

    nll_sum: float = 0.0
    count: int = 0
    hits: dict[int, int] = field(default_factory=lambda: dict.fromkeys(TOP_K, 0))

    def add(self, target_log_probs: np.ndarray, ranks: np.ndarray) -> None:
        target_log_probs = np.asarray(target_log_probs, dtype=np.float64).ravel()
        ranks = np.asarray(ranks).ravel()
        self.nll_sum -= float(target_log_probs.sum())
        self.count += int(target_log_probs.size)
        for k in TOP_K:
            self.hits[k] += int((ranks < k).sum())

    def result(self) -> dict[str, float]:
        if not self.count:
            raise ValueError("no positions were scored")
        nll = self.nll_sum / self.count
        out = {"nll": nll, "ppl": math.exp(nll), "tokens": self.count}
        out.update({f"top{k}": self.hits[k] / self.count for k in TOP_K})
        return out
