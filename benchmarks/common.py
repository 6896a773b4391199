"""What every section shares: result rows with targets, the run context, and timing helpers.

A figure is the median over ``repeats`` timed repetitions after ``warmup`` untimed calls; a
repetition times ``inner`` back-to-back calls (calibrated so one repetition lasts at least
``min_time``) and divides. Two things being compared are timed *interleaved* (A, B, A, B, ...)
so that a slow phase of the machine hits both alike.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("runtime", "roofline", "http", "overhead", "sessions", "capacity", "prompt", "training", "keyboard",
            "suggest", "adaptation", "soak")


@dataclass
class Row:
    """One line of the results table.

    ``value`` is the figure in ``unit``; ``display`` overrides how it prints (e.g. "not
    available"). ``target`` is the goal as text (``"≥ 3×"``) and ``met`` whether the figure
    reaches it (``None``: no target). ``note`` says what limits a figure that misses."""

    section: str
    name: str
    value: float | None
    unit: str = ""
    target: str | None = None
    met: bool | None = None
    note: str = ""
    display: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def at_least(value: float | None, threshold: float) -> bool | None:
    return None if value is None else value >= threshold


def at_most(value: float | None, threshold: float) -> bool | None:
    return None if value is None else value <= threshold


def unavailable(section: str, name: str, why: str, target: str | None = None) -> Row:
    return Row(section, name, None, display="not available", target=target, note=why)


@dataclass
class Context:
    """Settings of one benchmark run, handed to every section."""

    model_dir: Path
    quick: bool
    threads: int
    seed: int
    work_dir: Path
    servers: Any = None  # benchmarks.server.ServerPool, created by __main__
    shared: dict[str, Any] = field(default_factory=dict)  # figures one section hands to another

    def pick(self, default: Any, quick: Any) -> Any:
        return quick if self.quick else default

    @property
    def card(self) -> Any:
        from nextword.artifact import read_card

        return read_card(self.model_dir)


def log(message: str) -> None:
    """Progress goes to stderr, the table to stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Timing:
    median: float  # seconds per call
    samples: list[float]
    inner: int

    @property
    def ms(self) -> float:
        return self.median * 1e3

    def summary(self) -> dict[str, Any]:
        return {"median_ms": self.ms, "min_ms": min(self.samples) * 1e3, "max_ms": max(self.samples) * 1e3,
                "repeats": len(self.samples), "calls_per_repeat": self.inner}


def _calibrate(fn: Callable[[], Any], min_time: float, max_inner: int = 10_000) -> int:
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(max_inner, int(min_time / once)))


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 7,
                        min_time: float = 0.05, settle: float = 0.1) -> dict[str, Timing]:
    """Median seconds per call of each function, timed in alternation (see module docstring).
    ``settle`` seconds of sleep before each timed block let the previous one's worker threads
    (onnxruntime's intra-op pool and OpenMP's spin after their work for several milliseconds) go
    idle instead of competing with the next block: with 5 ms instead of 100 ms, a 512-token
    predict timed in alternation with the score graph measured 57 ms instead of 31 ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {name: _calibrate(fn, min_time) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    perf = time.perf_counter
    for _ in range(repeats):
        for name, fn in fns.items():
            n = inner[name]
            time.sleep(settle)
            start = perf()
            for _ in range(n):
                fn()
            samples[name].append((perf() - start) / n)
    return {name: Timing(statistics.median(s), s, inner[name]) for name, s in samples.items()}


def measure(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 7, min_time: float = 0.05,
            settle: float = 0.0) -> Timing:
    return measure_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, min_time=min_time, settle=settle)["fn"]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_async(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run a load generator's coroutine on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())  # type: ignore[arg-type]
    return uvloop.run(main())  # type: ignore[arg-type]
