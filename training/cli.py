"""``nextword-train``: train, evaluate, export, compare cells, plot curves, and the n-gram baseline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.data import CorpusError
from training.model import CELLS

DEFAULT_BROWN = "../shared/data/brown"


def _add_corpus(p: argparse.ArgumentParser, default: str | None = DEFAULT_BROWN, default_help: str = "") -> None:
    p.add_argument(
        "--corpus",
        default=default,
        help="corpus path: the Brown directory (ca01..cr09), a directory of train/valid/test files, one text "
        "file, or a folder of .txt documents (split deterministically, see training/data.py) "
        f"(default: {default_help or default})",
    )
    p.add_argument(
        "--corpus-format",
        default=None if default is None else "auto",
        choices=["auto", "brown", "ptb", "text"],
        help="auto: brown for a Brown directory, text otherwise; brown: Brown-LM protocol over word/tag files; "
        "ptb: tokenised one-sentence-a-line *train*/*valid*/*test* files (WikiText/PTB); text: free text "
        "through the service tokenizer (prepared split files, or one file / a folder of documents to split)",
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--cell", default="lstm", choices=CELLS, help="recurrent cell (see training/model.py)")
    g.add_argument("--embedding-size", type=int, default=400, help="word embedding width")
    g.add_argument("--hidden-size", type=int, default=400, help="recurrent state width per layer")
    g.add_argument("--num-layers", type=int, default=2, help="stacked recurrent layers")
    g.add_argument("--dropout-embedding", type=float, default=0.1, help="dropout on embeddings")
    g.add_argument("--dropout", type=float, default=0.3, help="dropout between recurrent layers")
    g.add_argument("--dropout-output", type=float, default=0.4, help="dropout before the softmax")
    g.add_argument(
        "--tied",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share input embedding and output softmax weights",
    )
    g.add_argument(
        "--zoneout",
        type=float,
        default=0.0,
        help="zoneout probability for h and c (lstm, peephole, cifg, gru); 0 disables",
    )
    g.add_argument(
        "--locked-dropout",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="variational dropout: the embedding/between-layer/output dropouts draw one mask per sequence, "
        "shared by every time step",
    )
    g.add_argument(
        "--dropout-words",
        type=float,
        default=0.0,
        help="embedding dropout: drop whole words (every occurrence in the batch) with this probability",
    )
    g.add_argument(
        "--weight-drop",
        type=float,
        default=0.0,
        help="DropConnect on the hidden-to-hidden weights, one mask per batch (all cells; training only)",
    )


def _add_optim(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="sequences per step (per process under torchrun)")
    g.add_argument("--bptt", type=int, default=35, help="truncated BPTT length; state carries across windows")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    g.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.05, help="final LR as a fraction of the peak (cosine)")
    g.add_argument("--warmup-steps", type=int, default=200, help="linear LR warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping threshold")
    g.add_argument(
        "--softmax",
        default="full",
        choices=["full", "sampled"],
        help="training softmax: exact, or sampled negatives (≈3x faster with an 18k vocabulary)",
    )
    g.add_argument("--samples", type=int, default=1024, help="negatives per step for --softmax sampled")
    g.add_argument(
        "--full-softmax-epochs",
        type=int,
        default=0,
        help="with --softmax sampled: train the last N epochs with the exact softmax",
    )
    g.add_argument("--patience", type=int, default=3, help="early stop after N epochs without a better valid ppl")
    g.add_argument("--seed", type=int, default=0, help="random seed (runs are deterministic for a given seed)")
    g.add_argument("--min-count", type=int, default=3, help="vocabulary: keep train words seen at least N times")
    g.add_argument("--max-vocab", type=int, default=None, help="vocabulary: keep at most N words")
    g.add_argument("--time-limit-minutes", type=float, default=None, help="stop training after this long")
    g.add_argument(
        "--max-train-tokens",
        type=int,
        default=None,
        help="token budget: stop after this many training tokens (the LR schedule ends there)",
    )
    g.add_argument("--max-eval-tokens", type=int, default=None, help="evaluate only the first N tokens of a split")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    g.add_argument("--ar", type=float, default=0.0, help="activation regularisation: weight of mean(output²)")
    g.add_argument(
        "--tar", type=float, default=0.0, help="temporal activation regularisation: weight of mean((h_t − h_t-1)²)"
    )
    g.add_argument(
        "--average",
        default="none",
        choices=["none", "ema", "uniform"],
        help="weight averaging (evaluated, checkpointed and exported in place of the raw weights)",
    )
    g.add_argument(
        "--average-start", type=float, default=0.5, help="fraction of training progress at which averaging starts"
    )
    g.add_argument("--ema-decay", type=float, default=0.999, help="decay of --average ema")
    g.add_argument(
        "--time-schedule",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --time-limit-minutes: the LR decay, the exact-softmax epochs and averaging follow the clock "
        "when the time limit comes before the epoch budget",
    )
    g.add_argument("--log-every", type=int, default=25, help="steps between progress/metrics-log updates")


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import train, train_config_from_args

    summary = train(train_config_from_args(args), resume=args.resume)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def _corpus_split(args: argparse.Namespace, split: str) -> list[str]:
    from training.data import load_corpus

    return getattr(load_corpus(args.corpus, args.corpus_format), split)


def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import score_stream
    from training.metrics import StreamMetrics

    splits = args.split
    report: dict[str, dict] = {}
    scored: dict[str, object] = {}
    for split in splits:
        words = _corpus_split(args, split)
        lp, ranks = score_stream(args.model, words, threads=args.threads)
        scored[split] = lp
        metrics = StreamMetrics()
        metrics.add(lp, ranks)
        report[split] = {"model": metrics.result()}
        if args.ngram_order:
            report[split][f"kn{args.ngram_order}"] = _ngram(args)[split]
    _print_report(report, args.ngram_order)
    adapted = _eval_adapted(args, scored) if args.cache or args.ksr else {}
    if args.json:
        Path(args.json).write_text(json.dumps({**report, **({"adapted": adapted} if adapted else {})}, indent=2))
    return 0


def _eval_adapted(args: argparse.Namespace, scored: dict) -> dict:
    from training.cache_eval import evaluate_adapted

    return evaluate_adapted(args.model, args.corpus, args.corpus_format, args.split, scored, cache=args.cache,
                            ksr=args.ksr, ksr_k=args.ksr_k, ksr_words=args.ksr_words, ngram_order=args.ngram_order,
                            threads=args.threads, update_card=args.update_card, ksr_head=args.ksr_head)


_NGRAM_CACHE: dict = {}


def _ngram(args: argparse.Namespace) -> dict:
    from training.ngram import run_ngram

    key = (args.corpus, args.ngram_order)
    if key not in _NGRAM_CACHE:
        _NGRAM_CACHE[key] = run_ngram(args.corpus, args.ngram_order, fmt=args.corpus_format)
    return _NGRAM_CACHE[key]


def _print_report(report: dict[str, dict], order: int | None) -> None:
    print(f"{'split':<6} {'model':<8} {'ppl':>9} {'top1':>7} {'top3':>7} {'top5':>7} {'tokens':>8}")
    for split, rows in report.items():
        for name, m in rows.items():
            print(
                f"{split:<6} {name:<8} {m['ppl']:>9.2f} {m['top1']:>7.4f} {m['top3']:>7.4f} {m['top5']:>7.4f} "
                f"{m['tokens']:>8}"
            )
        if order and "model" in rows:
            ratio = rows["model"]["ppl"] / rows[f"kn{order}"]["ppl"]
            print(f"{split:<6} ratio    {ratio:>9.3f}  (model ppl / KN-{order} ppl)")


def _corpus_from_run(args: argparse.Namespace, config: dict) -> None:
    """Without ``--corpus``, evaluate on the corpus the run was trained on: its path as given at
    training time, or, when that was relative to another directory, the absolute path saved beside it."""
    train_cfg = config.get("train", {})
    if args.corpus is None:
        saved = train_cfg.get("corpus")
        resolved = config.get("corpus_resolved")
        args.corpus = saved if saved and Path(saved).exists() else resolved or saved
        if args.corpus is None:
            raise CorpusError("the run's config.json names no corpus: give --corpus")
    if args.corpus_format is None:
        args.corpus_format = train_cfg.get("corpus_format", "auto")


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import evaluate_export, export_model, load_run, run_config, run_provenance

    run = Path(args.run)
    model, vocab = load_run(run)
    _corpus_from_run(args, run_config(run))
    casing = None
    if args.casing and args.corpus_format != "ptb":
        from training.casing import corpus_casing

        casing = corpus_casing(args.corpus, args.corpus_format)
    target = export_model(
        model,
        vocab,
        args.repository,
        args.name,
        args.version,
        weights_dtype=args.weights_dtype,
        quantize=args.quantize,
        training=run_provenance(run, args.train_command),
        overwrite=args.overwrite,
        casing=casing,
    )
    if args.evaluate:
        splits = {split: _corpus_split(args, split) for split in ("valid", "test")}
        ngram = (args.ngram_order, _ngram(args)) if args.ngram_order else None
        evaluate_export(target, splits, threads=args.threads, ngram=ngram)
    print(target)
    return 0


def cmd_fit_cache(args: argparse.Namespace) -> int:
    """Fit the cache language model on a held-out split and store it in model.json."""
    from training.cache_fit import fit_cache

    command = "nextword-train fit-cache " + " ".join(sys.argv[2:]) if args.record_command else None
    fit_cache(args.model, args.corpus, args.corpus_format, args.split, args.windows, args.threads, command)
    return 0


def cmd_presage(args: argparse.Namespace) -> int:
    from training.presage import presage_ksr

    result = presage_ksr(args.corpus, args.work, args.split, args.words, args.suggestions, args.modes)
    for mode in args.modes:
        r = result[mode]
        print(f"presage {mode:<15} KSR top-{args.suggestions} {100 * r['ksr']:6.2f}%  ({result['words']} words of "
              f"{args.split}, kn={r.get('kn')}, REPEAT_SUGGESTIONS={'no' if r['rotation'] else 'yes'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_casing(args: argparse.Namespace) -> int:
    from training.casing import add_casing

    print(add_casing(args.model, args.corpus, args.corpus_format))
    return 0


def cmd_ngram(args: argparse.Namespace) -> int:
    from training.ngram import run_ngram

    result = run_ngram(args.corpus, args.order, fmt=args.corpus_format, max_eval_tokens=args.max_eval_tokens)
    _print_report({s: {f"kn{args.order}": result[s]} for s in ("valid", "test")}, None)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from training.plot import plot_run

    print(plot_run(Path(args.run), Path(args.out) if args.out else None))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from training.compare import compare_cells

    compare_cells(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextword-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a language model",
        description="Train a model; writes checkpoints "
        "(last.pt, best.pt), vocab.txt, config.json, metrics.jsonl and summary.json into --out. "
        "Run under `torchrun --nproc-per-node N` for data-parallel training.",
    )
    _add_corpus(p)
    _add_model(p)
    _add_optim(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from --out/last.pt (same configuration)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate an exported model with onnxruntime",
        description="Perplexity and top-1/3/5 accuracy of a model version on corpus splits, "
        "reading each split as one stream with carried state.",
    )
    p.add_argument("--model", required=True, help="model version directory, e.g. models/brown-lstm/3")
    _add_corpus(p)
    p.add_argument("--split", nargs="+", default=["test"], choices=["train", "valid", "test"], help="splits")
    p.add_argument("--ngram-order", type=int, default=5, help="also evaluate a Kneser-Ney baseline (0 = skip)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="also report perplexity with the model's fitted cache (documents in order, the cache "
                   "reset at each)")
    p.add_argument("--ksr", action="store_true", help="also simulate typing: keystroke savings with and without "
                   "the cache and suggestion rotation, and the n-gram baseline's")
    p.add_argument("--ksr-k", type=int, default=3, help="suggestions offered per keystroke")
    p.add_argument("--ksr-words", type=int, default=None, help="simulate only the first N typed words")
    p.add_argument("--ksr-head", type=int, default=1889, help="also report the first N typed words alone (the "
                   "words nextword-train presage --words N types)")
    p.add_argument("--update-card", action="store_true", help="store the cache/KSR figures under the cache "
                   "section of model.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "fit-cache",
        help="fit the session cache language model and store it in model.json",
        description="Scores a held-out split with the model (onnxruntime), then fits the cache's window, "
        "decay, context smoothing and mixture weights for the lowest perplexity (documents read in order, "
        "the cache reset at each) and writes them to the cache section of model.json. Re-run it after "
        "replacing a model; a model without the section is served without a cache.",
    )
    p.add_argument("--model", required=True, help="model version directory, e.g. models/brown-lstm/3")
    _add_corpus(p)
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="split to fit on")
    p.add_argument("--windows", type=int, nargs="+", default=[250, 500, 1000, 2000],
                   help="candidate windows (words); the best is kept, each one's perplexity is recorded")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--record-command", action=argparse.BooleanOptionalAction, default=True,
                   help="store this command line in the card")
    p.set_defaults(func=cmd_fit_cache)

    p = sub.add_parser(
        "export",
        help="export a trained run into the model repository",
        description="Builds ONNX graphs from --run/best.pt, checks onnxruntime against torch, "
        "and writes models/<name>/<version>/ with model.json.",
    )
    p.add_argument("--run", required=True, help="training run directory (with best.pt and vocab.txt)")
    p.add_argument("--repository", default="models", help="model repository root")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--version", type=int, default=None, help="version (default: next free)")
    p.add_argument(
        "--weights-dtype",
        default="float32",
        choices=["float32", "float16"],
        help="storage precision of the weights (float16 halves the size; compute stays float32)",
    )
    p.add_argument("--quantize", choices=["int8"], default=None, help="also write a dynamically quantized graph")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version directory")
    p.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the exported graphs on valid/test and store the metrics in model.json",
    )
    p.add_argument("--ngram-order", type=int, default=5, help="baseline order stored beside the metrics (0 = none)")
    p.add_argument("--train-command", default=None, help="the command that trained the run (for the model card)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument(
        "--casing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count how words are written in the corpus's training split and store it as casing.tsv "
        "(skipped for lowercased ptb corpora)",
    )
    _add_corpus(p, default=None, default_help="the corpus and format the run was trained on")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "presage",
        help="keystroke savings of Debian's presage on the words eval --ksr types",
        description="Builds presage's n-gram database from the Brown-LM training split (text2ngram -n 1..3) and "
        "runs presage_simulator with 3 suggestions on the split's first N alphabetic words, with online learning "
        "off and on, with and without its suggestion rotation. Compare with: nextword-train eval --ksr "
        "--ksr-head N (the same words).",
    )
    p.add_argument("--corpus", default=DEFAULT_BROWN, help=f"the Brown directory (default: {DEFAULT_BROWN})")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--words", type=int, default=1889, help="typed words (default: the first test file's 1,888 "
                   "and one more)")
    p.add_argument("--suggestions", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["static", "learning", "static-repeat", "learning-repeat"],
                   choices=["static", "learning", "static-repeat", "learning-repeat"],
                   help="online learning off (static) or on, with presage's default suggestion rotation "
                   "(REPEAT_SUGGESTIONS no) or without it (-repeat)")
    p.add_argument("--work", default="runs/presage", help="where the database and configurations go")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_presage)

    p = sub.add_parser(
        "casing",
        help="add casing statistics to an exported model version",
        description="Counts each vocabulary word's written forms in the corpus's training split (sentence "
        "starts excluded) and adds casing.tsv to the version, rewriting model.json's checksums.",
    )
    p.add_argument("--model", required=True, help="model version directory, e.g. models/brown-lstm/3")
    _add_corpus(p)
    p.set_defaults(func=cmd_casing)

    p = sub.add_parser("ngram", help="the interpolated modified Kneser-Ney baseline")
    _add_corpus(p)
    p.add_argument("--order", type=int, default=5, help="n-gram order")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--json", help="write the result to this JSON file")
    p.set_defaults(func=cmd_ngram)

    p = sub.add_parser("plot", help="plot training curves of a run to PNG")
    p.add_argument("run", help="run directory containing metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: <run>/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "compare",
        help="train every cell at an equal budget and tabulate",
        description="Trains each cell for the same wall-clock budget with the same settings, "
        "exports it, measures onnxruntime step latency, and writes a Markdown table.",
    )
    _add_corpus(p)
    p.add_argument(
        "--cells",
        nargs="+",
        default=["rnn", "lstm", "peephole", "cifg", "gru", "highway", "lstm+zoneout", "gru+zoneout"],
        help="entries to compare: a cell; 'cell+zoneout' adds zoneout; a '-x' suffix switches technique x of the "
        "recipe off (x: dropout, locked, weightdrop, worddrop, artar, average), for an ablation table. Finished "
        "entries are reused when --out already holds them with the same settings",
    )
    p.add_argument("--tokens", type=int, default=500_000, help="training budget per cell, in tokens (equal for all)")
    p.add_argument("--minutes", type=float, default=None, help="optional wall-clock cap per cell")
    p.add_argument("--compare-zoneout", type=float, default=0.1, help="zoneout probability for '+zoneout' entries")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--readme", default=None, help="update the table between markers in this README")
    _add_model(p)
    _add_optim(p)
    p.set_defaults(func=cmd_compare)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors about the user's input (paths, corpora, checkpoints, artifacts): one line, exit 2.
    Imported late so ``--help`` does not load torch."""
    from nextword.artifact import ArtifactError
    from training.compare import CompareError
    from training.export import ExportError
    from training.presage import PresageError
    from training.train import CheckpointError

    return CorpusError, CheckpointError, ArtifactError, ExportError, PresageError, CompareError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise

if __name__ == "__main__":
    sys.exit(main())
