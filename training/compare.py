"""The cell comparison: every cell trained with the same settings for the same token budget,
exported, evaluated with onnxruntime, and timed for one recurrent step at batch 1.

An entry is a cell, optionally ``+zoneout``, optionally followed by ``-technique`` suffixes that
switch one regularisation technique of the recipe off (``lstm-weightdrop``): the same command then
gives the ablation table. Each finished entry leaves ``row.json`` in its run directory, and a later
run with the same settings reuses it, so an interrupted comparison resumes, and two processes given
disjoint ``--cells`` and the same ``--out`` share the work (a last run over all entries writes the
whole table)."""

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


class CompareError(ValueError):
    """A --cells entry that names no cell or technique."""


# What ``-name`` switches off, as overrides of the command's arguments.
ABLATIONS: dict[str, dict[str, object]] = {
    "dropout": {"dropout_embedding": 0.0, "dropout": 0.0, "dropout_output": 0.0},
    "locked": {"locked_dropout": False},
    "weightdrop": {"weight_drop": 0.0},
    "worddrop": {"dropout_words": 0.0},
    "artar": {"ar": 0.0, "tar": 0.0},
    "average": {"average": "none"},
}
# Arguments that must match for a saved row to stand for this run.
_RECIPE_KEYS = (
    "tokens",
    "minutes",
    "compare_zoneout",
    "embedding_size",
    "hidden_size",
    "num_layers",
    "tied",
    "dropout_embedding",
    "dropout",
    "dropout_output",
    "locked_dropout",
    "dropout_words",
    "weight_drop",
    "batch_size",
    "bptt",
    "epochs",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "clip",
    "softmax",
    "samples",
    "full_softmax_epochs",
    "seed",
    "min_count",
    "max_vocab",
    "max_eval_tokens",
    "ar",
    "tar",
    "average",
    "average_start",
    "ema_decay",
)


def parse_entry(spec: str, args: argparse.Namespace) -> tuple[str, argparse.Namespace]:
    """``lstm+zoneout-weightdrop`` -> (run directory name, the training arguments of that entry)."""
    from training.model import CELLS

    head, *removed = spec.split("-")
    cell, _, extra = head.partition("+")
    if cell not in CELLS or extra not in ("", "zoneout") or any(r not in ABLATIONS for r in removed):
        raise CompareError(
            f"--cells: unknown entry {spec!r}; an entry is a cell ({', '.join(CELLS)}), optionally '+zoneout', "
            f"then any of {', '.join('-' + a for a in ABLATIONS)}"
        )
    ns = argparse.Namespace(**vars(args))
    ns.cell, ns.zoneout = cell, args.compare_zoneout if extra == "zoneout" else 0.0
    for name in removed:
        for key, value in ABLATIONS[name].items():
            setattr(ns, key, value)
    return head.replace("+", "-plus-") + "".join(f"-no-{r}" for r in removed), ns


def label(spec: str) -> str:
    """How an entry reads in the table: ``lstm-weightdrop`` -> ``lstm without weightdrop``."""
    head, *removed = spec.split("-")
    return f"{head} without {', '.join(removed)}" if removed else head


def _recipe(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k, None) for k in _RECIPE_KEYS} | {"corpus": str(getattr(args, "corpus", ""))}


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


def describe_recipe(args: argparse.Namespace) -> str:
    """The regularisation recipe in words, for the table's header."""
    parts = []
    drops = f"{args.dropout_embedding:g}/{args.dropout:g}/{args.dropout_output:g}"
    parts.append(("locked " if args.locked_dropout else "") + f"dropout {drops} (embedding/between/output)")
    if args.dropout_words:
        parts.append(f"word dropout {args.dropout_words:g}")
    if args.weight_drop:
        parts.append(f"weight drop {args.weight_drop:g}")
    if args.ar or args.tar:
        parts.append(f"AR {args.ar:g}, TAR {args.tar:g}")
    if args.average != "none":
        decay = f" {args.ema_decay:g}" if args.average == "ema" else ""
        parts.append(
            f"{args.average.upper() if args.average == 'ema' else args.average} averaging{decay} "
            f"from {args.average_start:.0%} of training"
        )
    return ", ".join(parts)


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"Each entry: {args.tokens:,} training tokens on Brown-LM train ({args.softmax} softmax, batch "
        f"{args.batch_size}, BPTT {args.bptt}, Adam {args.lr:g}, {args.num_layers} layers, "
        f"E={args.embedding_size}, H={args.hidden_size}, tied={args.tied}; {describe_recipe(args)}; "
        f"zoneout {args.compare_zoneout:g} for '+zoneout', '-x' switches technique x off), valid/test on "
        f"{'the first ' + format(args.max_eval_tokens, ',') if args.max_eval_tokens else 'all'} tokens of each "
        "split; step latency = onnxruntime, batch 1, 1 thread.\n\n"
    )
    lines = [
        "| cell | params | train min | train tok/s | tokens seen | valid ppl | test ppl | top-1 | top-3 | step ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ablated = [r for r in rows if "-" in r["cell"]]
    for r in rows:
        if r in ablated:
            continue
        lines.append(
            f"| {label(r['cell'])} | {r['parameters'] / 1e6:.2f} M | {r['train_minutes']:.1f} | "
            f"{r['train_tokens_per_s']:.0f} | {r['tokens_seen'] / 1e6:.2f} M | "
            f"{r['valid_ppl']:.1f} | {r['test_ppl']:.1f} | "
            f"{r['top1']:.3f} | {r['top3']:.3f} | {r['step_ms']:.3f} |"
        )
    return head + "\n".join(lines) + "\n" + _ablation_table(rows, ablated)


def _ablation_table(rows: list[dict], ablated: list[dict]) -> str:
    """Each '-x' entry beside its full-recipe entry: what switching the technique off costs on valid."""
    full = {r["cell"]: r for r in rows if "-" not in r["cell"]}
    lines = []
    for r in ablated:
        base = full.get(r["cell"].split("-")[0])
        if base is None:
            continue
        if not lines:
            lines = [
                "",
                f"Ablation on {base['cell']} (same budget; + means the technique helps):",
                "",
                "| entry | valid ppl | valid ppl, full recipe | the technique's gain on valid | test ppl |",
                "|---|---:|---:|---:|---:|",
            ]
        gain = r["valid_ppl"] - base["valid_ppl"]
        lines.append(
            f"| {label(r['cell'])} | {r['valid_ppl']:.1f} | {base['valid_ppl']:.1f} | "
            f"{gain:+.1f} ({gain / r['valid_ppl']:+.1%}) | {r['test_ppl']:.1f} |"
        )
    return "\n".join(lines) + ("\n" if lines else "")


def compare_cells(args: argparse.Namespace) -> list[dict]:
    from training.export import export_model, load_run
    from training.train import train, train_config_from_args

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = [(spec, *parse_entry(spec, args)) for spec in args.cells]  # every entry checked before any training
    rows = []
    for spec, name, ns in entries:
        run = out / name
        saved = run / "row.json"
        recipe = _recipe(ns) | {"cell": ns.cell, "zoneout": ns.zoneout}
        if saved.exists() and (row := json.loads(saved.read_text())).get("recipe") == recipe:
            print(f"{spec}: reusing {saved}")
            rows.append(row)
            continue
        ns.out = str(run)
        ns.time_limit_minutes, ns.max_train_tokens, ns.patience = args.minutes, args.tokens, 10**6
        cfg = train_config_from_args(ns)
        cfg.valid_tokens = args.max_eval_tokens
        summary = train(cfg)
        model, vocab = load_run(run)
        target = export_model(model, vocab, out / "repository", name, overwrite=True, version=1)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        steps = summary["steps"]
        row = {
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
            "recipe": recipe,
        }
        saved.write_text(json.dumps(row, indent=2))
        rows.append(row)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
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
