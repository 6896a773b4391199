"""Training curves from a run's ``metrics.jsonl`` to PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    records = read_log(run / "metrics.jsonl")
    train = [r for r in records if r["event"] == "train"]
    valid = [r for r in records if r["event"] == "valid"]
    if not train:
        raise ValueError(f"{run / 'metrics.jsonl'} has no training records")
    penalties = [k for k in ("ar", "tar") if any(k in r for r in train)]
    fig, axes = plt.subplots(1, 3 if penalties else 2, figsize=(18 if penalties else 12, 4.5))
    ax_ppl, ax_tps = axes[0], axes[1]
    sampled = [r for r in train if not r.get("exact_softmax", True)]
    exact = [r for r in train if r.get("exact_softmax", True)]
    if sampled:
        ax_ppl.plot(
            [r["step"] for r in sampled], [r["ppl"] for r in sampled], label="train (sampled softmax)", alpha=0.7
        )
    if exact:
        ax_ppl.plot([r["step"] for r in exact], [r["ppl"] for r in exact], label="train (exact softmax)", alpha=0.7)
    if valid:
        ax_ppl.plot([r["step"] for r in valid], [r["ppl"] for r in valid], "o-", label="valid")
        averaged = [r for r in valid if r.get("averaged")]
        if averaged:
            ax_ppl.plot(
                [r["step"] for r in averaged],
                [r["ppl"] for r in averaged],
                "s",
                mfc="none",
                ms=10,
                label="valid (averaged weights)",
            )
    started = next((r["step"] for r in train if r.get("averaging")), None)
    if started is not None:
        ax_ppl.axvline(started, color="grey", linestyle="--", label="weight averaging starts")
    ax_ppl.set_yscale("log")
    ax_ppl.set_xlabel("step")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.grid(True, which="both", alpha=0.3)
    ax_ppl.legend()
    ax_tps.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax_tps.set_xlabel("step")
    ax_tps.set_ylabel("training tokens / s")
    ax_tps.grid(True, alpha=0.3)
    if penalties:
        for key in penalties:
            rows = [r for r in train if key in r]
            axes[2].plot([r["step"] for r in rows], [r[key] for r in rows], label=key.upper())
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("penalty added to the loss")
        axes[2].grid(True, alpha=0.3)
        axes[2].legend()
    fig.suptitle(run.name)
    fig.tight_layout()
    out = out or run / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
