"""``python -m benchmarks`` / ``nextword-bench``: the benchmark suite (see ``benchmarks/__init__.py``).

Examples::

    python -m benchmarks                          # everything, default model, ≤ 5 minutes on 2 cores
    python -m benchmarks --quick                  # a smaller run, ≤ 60 s
    python -m benchmarks --only runtime,roofline  # some sections
    python -m benchmarks --readme README.md       # also refresh the README's benchmark table
    python -m benchmarks --only keyboard --readme README.md  # refresh that section's rows, keep the rest
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import SECTIONS, Context, Row, log
from nextword.artifact import version_dirs

DEFAULT_MODEL = "brown-lstm"


def default_model(repository: Path = Path("models")) -> Path:
    """The highest version of ``models/brown-lstm`` (the one the service serves), else the most
    recently written version in ``models/``."""
    shipped = version_dirs(repository).get(DEFAULT_MODEL, {})
    if shipped:
        return shipped[max(shipped)]
    candidates = sorted(repository.glob("*/*/model.json"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"error: no model in {repository}/ (export one, or pass --model)")
    return candidates[-1].parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextword-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help=f"model version directory (default: the highest version of models/{DEFAULT_MODEL}, "
                        "else the newest in models/)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and requests, smaller training sizes")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for torch, onnxruntime and the service (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/latest.json"), help="JSON results file")
    parser.add_argument("--readme", type=Path, default=None,
                        help="replace the text between <!-- bench:start --> and <!-- bench:end --> in this file "
                        "(with --only: just those sections' rows)")
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs and texts")
    return parser


def command_line(argv: list[str]) -> str:
    prog = Path(sys.argv[0]).name
    head = "nextword-bench" if prog == "nextword-bench" else "python -m benchmarks"
    return " ".join([head, *map(shlex.quote, argv)])


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy (``/proc/stat``) over ``seconds`` before the run: other work that
    would make the figures pessimistic."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("onnxruntime", "torch", "numpy", "uvicorn", "fastapi", "httpx"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    threads = args.threads or os.cpu_count() or 1
    # numpy's BLAS reads its thread count when first loaded: set it before anything imports numpy
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    from benchmarks import report
    from benchmarks.server import ServerPool
    from nextword.artifact import ArtifactError, read_card

    model_dir = args.model or default_model()
    try:
        card = read_card(model_dir)
    except ArtifactError as exc:
        raise SystemExit(f"error: {exc}") from None

    busy_before = cpu_busy_fraction()
    started = time.time()
    work_dir = Path(tempfile.mkdtemp(prefix="nextword-bench-"))
    ctx = Context(model_dir=model_dir, quick=args.quick, threads=threads, seed=args.seed, work_dir=work_dir)
    ctx.servers = ServerPool(model_dir, work_dir, threads)
    log(f"model {model_dir} ({card.cell}, E={card.embedding_size}, H={card.hidden_size}, V={card.vocab_size}); "
        f"{threads} threads; sections {','.join(s for s in SECTIONS if s in only)}; work dir {work_dir}")

    runners = _runners()
    rows: list[Row] = []
    errors: list[dict[str, str]] = []
    try:
        for section in SECTIONS:
            if section not in only:
                continue
            t0 = time.time()
            try:
                rows += runners[section](ctx)
            except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
                traceback.print_exc()
                errors.append({"section": section, "error": f"{type(exc).__name__}: {exc}"})
                rows.append(Row(section, f"{section} section failed", None, display="failed",
                                note=f"{type(exc).__name__}: {str(exc)[:300]}"))
            log(f"{section}: {time.time() - t0:.1f} s")
    finally:
        ctx.servers.stop_all()
        if not errors:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            log(f"logs kept in {work_dir}")

    from benchmarks.report import cpu_flags, cpu_model

    flags = cpu_flags()
    meta = {
        "command": command_line(argv),
        "started": dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": time.time() - started,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "avx2": "avx2" in flags,
                    "avx512": "avx512f" in flags,
                    "busy_before_start": busy_before},
        "versions": _versions(),
        "threads": threads,
        "quick": args.quick,
        "sections": [s for s in SECTIONS if s in only],
        "model": {"path": str(model_dir), "name": card.name, "version": card.version, "cell": card.cell,
                  "num_layers": card.num_layers, "embedding_size": card.embedding_size,
                  "hidden_size": card.hidden_size, "vocab_size": card.vocab_size, "tied": card.tied,
                  "weights_dtype": card.weights_dtype, "graphs": card.graphs},
        "json": str(args.out),
    }
    text = report.render(meta, rows)
    print(text)
    report.write_json(args.out, meta, rows, errors)
    log(f"wrote {args.out}")
    if args.readme:
        try:
            original = args.readme.read_text(encoding="utf-8")
            block = text
            if set(only) != set(SECTIONS):  # some sections only: the others' rows stay in the table
                ran = [s for s in SECTIONS if s in only]
                block = report.merge_sections(report.between_markers(original), meta, rows, ran, SECTIONS)
            args.readme.write_text(report.replace_between_markers(original, block), encoding="utf-8")
            log(f"updated the benchmark table in {args.readme}")
        except (OSError, ValueError) as exc:
            log(f"not updating {args.readme}: {exc}")
    return 1 if errors else 0


def _runners() -> dict:
    from benchmarks.adaptation import run_adaptation
    from benchmarks.capacity import run_capacity
    from benchmarks.http_load import run_http, run_overhead
    from benchmarks.keyboard import run_keyboard
    from benchmarks.prompt import run_prompt
    from benchmarks.runtime import run_roofline, run_runtime
    from benchmarks.sessions import run_sessions
    from benchmarks.soak import run_soak
    from benchmarks.suggest import run_suggest
    from benchmarks.training_loop import run_training

    return {"runtime": run_runtime, "roofline": run_roofline, "http": run_http, "overhead": run_overhead,
            "sessions": run_sessions, "capacity": run_capacity, "prompt": run_prompt, "training": run_training,
            "keyboard": run_keyboard, "suggest": run_suggest, "adaptation": run_adaptation, "soak": run_soak}


if __name__ == "__main__":
    sys.exit(main())
