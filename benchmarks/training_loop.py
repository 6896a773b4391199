"""Section ``training``: tokens/s of the trainer's step against a minimal reference loop.

The project step is what ``training.train.train`` runs per batch: ``LanguageModel.features`` with
carried, detached state (training mode: dropouts on), ``full_softmax_loss`` (or
``sampled_softmax_loss``), ``zero_grad`` / ``backward`` / ``clip_grad_norm_`` / Adam ``step``. The
reference is the textbook loop: ``nn.Embedding`` → ``nn.LSTM`` → ``nn.Linear`` (tied) →
``F.cross_entropy``, with the same sizes, batch, optimizer and clipping. The two are timed
alternately. Then every other cell runs the project step at the same sizes.

Sizes are moderate so the section fits the run's time budget; they are stated in the table.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import Context, Row, Timing, at_least, log, measure, measure_interleaved

TARGET_VS_REFERENCE = 0.9
CELL_VARIANTS = (("peephole", 0.0), ("cifg", 0.0), ("gru", 0.0), ("rnn", 0.0), ("highway", 0.0), ("lstm", 0.1))


def _sizes(ctx: Context) -> dict[str, int]:
    return ctx.pick({"vocab": 10000, "embedding": 256, "hidden": 256, "layers": 2, "batch": 32, "bptt": 35},
                    {"vocab": 2000, "embedding": 64, "hidden": 64, "layers": 2, "batch": 8, "bptt": 20})


def _data(s: dict[str, int], seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Zipf-like ids: a realistic spread of rows touched in the embedding gradient
    ranks = torch.arange(1, s["vocab"] + 1, dtype=torch.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    return torch.multinomial(probs, s["batch"] * (s["bptt"] * 8 + 1), replacement=True, generator=g).view(
        s["batch"], -1)


class _Stepper:
    """Cycles through BPTT windows of ``data`` with carried state, one optimizer step per call."""

    def __init__(self, data: Any, bptt: int, step: Any, init_state: Any) -> None:
        self.data, self.bptt, self.step = data, bptt, step
        self.state = init_state
        self.pos = 0

    def __call__(self) -> None:
        if self.pos + self.bptt + 1 > self.data.shape[1]:
            self.pos = 0
        x = self.data[:, self.pos : self.pos + self.bptt]
        y = self.data[:, self.pos + 1 : self.pos + 1 + self.bptt]
        self.pos += self.bptt
        self.state = self.step(x, y, tuple(s.detach() for s in self.state))


def project_stepper(s: dict[str, int], data: Any, cell: str = "lstm", zoneout: float = 0.0,
                    softmax: str = "full", samples: int = 1024, seed: int = 0) -> _Stepper:
    import numpy as np
    import torch

    from training.model import LanguageModel, ModelConfig
    from training.train import NegativeSampler, full_softmax_loss, sampled_softmax_loss

    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig(vocab_size=s["vocab"], cell=cell, embedding_size=s["embedding"],
                                      hidden_size=s["hidden"], num_layers=s["layers"], zoneout=zoneout)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = None
    if softmax == "sampled":
        counts = np.bincount(data.reshape(-1).numpy(), minlength=s["vocab"]).astype(np.float64)
        sampler = NegativeSampler(counts, samples, torch.Generator().manual_seed(seed))

    def step(x: Any, y: Any, state: Any) -> Any:
        feats, state = model.features(x, state)
        loss = full_softmax_loss(model, feats, y) if sampler is None else sampled_softmax_loss(model, feats, y, sampler)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        return state

    return _Stepper(data, s["bptt"], step, model.initial_state(s["batch"]))


def reference_stepper(s: dict[str, int], data: Any, seed: int = 0) -> _Stepper:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)
    V, E, H, L = s["vocab"], s["embedding"], s["hidden"], s["layers"]
    emb = nn.Embedding(V, E)
    lstm = nn.LSTM(E, H, num_layers=L, dropout=0.3, batch_first=True)
    out = nn.Linear(H, V)
    out.weight = emb.weight  # tied, as the project model (E == H here)
    params = list({id(p): p for m in (emb, lstm, out) for p in m.parameters()}.values())
    opt = torch.optim.Adam(params, lr=1e-3)

    def step(x: Any, y: Any, state: Any) -> Any:
        h, state = lstm(emb(x), state)
        loss = F.cross_entropy(out(h).reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss.item()
        return state

    zeros = torch.zeros(L, s["batch"], H)
    return _Stepper(data, s["bptt"], step, (zeros, zeros.clone()))


def run_training(ctx: Context) -> list[Row]:
    import torch

    torch.set_num_threads(ctx.threads)
    torch.set_flush_denormal(True)  # as the trainer does
    s = _sizes(ctx)
    if s["embedding"] != s["hidden"]:
        raise ValueError("the reference loop ties weights and needs embedding == hidden")
    data = _data(s, ctx.seed)
    tokens = s["batch"] * s["bptt"]
    size_txt = (f"V={s['vocab']:,}, E=H={s['hidden']}, {s['layers']} layers, batch {s['batch']} × bptt {s['bptt']}, "
                f"{ctx.threads} threads")
    timing = {"warmup": 2, "repeats": ctx.pick(7, 2), "min_time": 0.0}

    log(f"training: lstm step vs reference loop ({size_txt})")
    t = measure_interleaved({"project": project_stepper(s, data, seed=ctx.seed),
                             "reference": reference_stepper(s, data, seed=ctx.seed)}, **timing)
    tps = {k: tokens / v.median for k, v in t.items()}
    ratio = tps["project"] / tps["reference"]
    rows = [Row(
        "training", f"lstm training step vs minimal nn.LSTM loop ({size_txt})", ratio, "×",
        target=f"≥ {TARGET_VS_REFERENCE:g}×", met=at_least(ratio, TARGET_VS_REFERENCE),
        display=f"{ratio:.2f}× ({tps['project']:,.0f} vs {tps['reference']:,.0f} tokens/s)",
        note="" if ratio >= TARGET_VS_REFERENCE else
        "the project step adds embedding/output dropout and the features()/decoder split; both run nn.LSTM",
        details={"sizes": s, "project": t["project"].summary(), "reference": t["reference"].summary(),
                 "tokens_per_step": tokens},
    )]

    samples = ctx.pick(1024, 128)
    sampled = measure(project_stepper(s, data, softmax="sampled", samples=samples, seed=ctx.seed), **timing)
    rows.append(_tps_row(f"lstm, sampled softmax ({samples} negatives)", sampled, tokens, tps["project"], s))
    for cell, zoneout in CELL_VARIANTS:
        label = f"{cell}+zoneout {zoneout:g}" if zoneout else cell
        log(f"training: {label}")
        timed = measure(project_stepper(s, data, cell=cell, zoneout=zoneout, seed=ctx.seed), **timing)
        rows.append(_tps_row(label, timed, tokens, tps["project"], s))
    return rows


def _tps_row(label: str, t: Timing, tokens: int, lstm_tps: float, s: dict[str, int]) -> Row:
    tps = tokens / t.median
    return Row("training", f"training tokens/s, {label}", tps, "tokens/s",
               display=f"{tps:,.0f} tokens/s ({tps / lstm_tps:.2f}× lstm, full softmax unless stated)",
               details={"sizes": s, "step": t.summary()})
