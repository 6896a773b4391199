"""Weight averaging for Adam-trained models: an exponential moving average or a uniform (Polyak)
average of the weights after every optimiser step, from a chosen point of training on.

This is the Adam-compatible counterpart of NT-ASGD's averaging (Merity et al. 2017): the
averaged weights are the ones evaluated on valid, checkpointed as the model, and exported; the
raw weights keep training underneath.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

MODES = ("none", "ema", "uniform")


class WeightAverage:
    def __init__(self, mode: str, ema_decay: float = 0.999) -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"averaging mode must be one of {', '.join(MODES[1:])}, not {mode!r}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError("ema_decay must be in (0, 1)")
        self.mode, self.ema_decay = mode, ema_decay
        self.count = 0  # optimiser steps averaged so far
        self.params: dict[str, Tensor] = {}

    @property
    def active(self) -> bool:
        return self.count > 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights in (the first call starts the average at them)."""
        # named_parameters() yields a tied parameter once, so the embedding/softmax stay tied.
        for name, p in model.named_parameters():
            if not self.count:
                self.params[name] = p.detach().clone()
            else:
                weight = 1.0 - self.ema_decay if self.mode == "ema" else 1.0 / (self.count + 1)
                self.params[name].lerp_(p.detach(), weight)
        self.count += 1

    @contextmanager
    @torch.no_grad()
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in ``model`` for the duration of the block (a no-op before the
        first update), the raw training weights restored afterwards."""
        if not self.active:
            yield
            return
        raw = {name: p.detach().clone() for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.copy_(self.params[name])
        try:
            yield
        finally:
            for name, p in model.named_parameters():
                p.copy_(raw[name])

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "ema_decay": self.ema_decay, "count": self.count, "params": self.params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mode, self.ema_decay, self.count = state["mode"], state["ema_decay"], state["count"]
        self.params = {k: v.clone() for k, v in state["params"].items()}
