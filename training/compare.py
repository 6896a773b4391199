"""The cell comparison: every cell trained with the same settings for the same wall-clock budget,
exported, evaluated with onnxruntime, and timed for one recurrent step at batch 1."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nextword import artifact as A

MARK_START, MARK_END = "<!-- cells:start -->", "<!-- cells:end -->"


def step_latency_ms(model_dir: Path, repeats: int = 300) -> float:
    """Median onnxruntime time of one token at batch 1 through the predict graph (1 thread)."""
    card = A.read_card(model_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_dir / card.graphs["predict"]), opts, providers=["CPUExecutionProvider"])
    feeds = {A.TOKENS: np.array([[5]], np.int64), A.LENGTHS: np.array([1], np.int64)}
    feeds.update(
        {A.state_input(s): np.zeros((card.num_layers, 1, card.hidden_size), np.float32) for s in card.state_names}
    )
    for _ in range(20):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"Each cell: {args.tokens:,} training tokens on Brown-LM train ({args.softmax} softmax, batch "
        f"{args.batch_size}, BPTT {args.bptt}, Adam {args.lr:g}, {args.num_layers} layers, "
        f"E={args.embedding_size}, H={args.hidden_size}, tied={args.tied}), valid/test on the first "
        f"{args.max_eval_tokens or 'all'} tokens of each split; step latency = onnxruntime, batch 1, 1 thread.\n\n"
    )
    lines = [
        "| cell | params | train min | train tok/s | tokens seen | valid ppl | test ppl | top-1 | top-3 | step ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['parameters'] / 1e6:.2f} M | {r['train_minutes']:.1f} | "
            f"{r['train_tokens_per_s']:.0f} | {r['tokens_seen'] / 1e6:.2f} M | "
            f"{r['valid_ppl']:.1f} | {r['test_ppl']:.1f} | "
            f"{r['top1']:.3f} | {r['top3']:.3f} | {r['step_ms']:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def compare_cells(args: argparse.Namespace) -> list[dict]:
    from training.export import export_model, load_run
    from training.train import train, train_config_from_args

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.cells:
        cell, _, extra = spec.partition("+")
        run = out / spec.replace("+", "-")
        ns = argparse.Namespace(**vars(args))
        ns.cell, ns.zoneout, ns.out = cell, args.compare_zoneout if extra == "zoneout" else 0.0, str(run)
        ns.time_limit_minutes, ns.max_train_tokens, ns.patience = args.minutes, args.tokens, 10**6
        cfg = train_config_from_args(ns)
        cfg.valid_tokens = args.max_eval_tokens
        summary = train(cfg)
        model, vocab = load_run(run)
        target = export_model(model, vocab, out / "repository", spec.replace("+", "-"), overwrite=True, version=1)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        steps = summary["steps"]
        rows.append(
            {
                "cell": spec,
                "parameters": summary["parameters"],
                "train_minutes": summary["train_minutes"],
                "tokens_seen": steps * args.batch_size * args.bptt,
                "valid_ppl": summary["valid"]["ppl"],
                "test_ppl": summary["test"]["ppl"],
                "top1": summary["test"]["top1"],
                "top3": summary["test"]["top3"],
                "step_ms": step_latency_ms(target),
                "train_tokens_per_s": _mean_tps(records),
            }
        )
        (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = _table(rows, args)
    (out / "table.md").write_text(table)
    print(table)
    if args.readme:
        readme = Path(args.readme)
        text = readme.read_text()
        pattern = re.compile(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), re.S)
        readme.write_text(pattern.sub(lambda _: f"{MARK_START}\n{table}{MARK_END}", text))
    return rows


def _mean_tps(records: list[dict]) -> float:
    tps = [r["tokens_per_s"] for r in records if r["event"] == "train"]
    return float(np.mean(tps)) if tps else 0.0
