"""Section ``soak``: a minute of steady mixed traffic, for errors and for memory that only grows.

A fresh service (in-memory session store) takes ``CLIENTS`` clients for ``SECONDS`` seconds after
an untimed warm-up. Each client is its own keep-alive connection (:mod:`benchmarks.http_client`),
sending back to back, in a fixed cycle of eight requests: five ``POST /v1/predict`` on 5–20-word
texts (:mod:`benchmarks.texts`), two one-word updates of its own session, and a ``POST /v1/score``
or a four-word ``POST /v1/generate`` in turn; every 50 cycles it deletes its session and creates a
new one, so sessions come and go as they do in service. Any answer but 2xx, or a failed exchange,
is an error (in the warm-up too).

The server's resident memory (``VmRSS`` from ``/proc``) is sampled twice a second through the
timed phase; a leak shows as growth from the first half to the second. The figure is the
difference of the halves' medians (a median ignores a momentary peak, a leak moves it); the
halves' peaks and the second half's slope (a leak keeps climbing there; settling does not) are
reported beside it.

The load generator runs in its own process (``python -m benchmarks.soak '<json config>'``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import Context, Row, at_most, log, percentile, run_async
from benchmarks.server import ROOT, process_cpu_seconds, rss_mb
from benchmarks.texts import WORDS, short_texts

CLIENTS = 64
SECONDS = 60.0
# The process settles during the first half minute under this load (arenas, the heap): ~600 MB from
# 273 MB idle, with a last step of ~15 MB seen 28 s in. Measuring from 20 s keeps settling out of
# the first half's median, where it would pass for growth.
WARMUP_SECONDS = 20.0
RSS_INTERVAL_S = 0.5
TARGET_ERRORS = 0
TARGET_GROWTH = 0.02  # second-half median RSS at most 2% above the first half's
SESSION_CYCLES = 50


# --------------------------------------------------------------------------- the load generator process


async def _soak(cfg: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.http_client import HTTPConnection

    url, pid = cfg["url"], cfg.get("server_pid")
    extra = {"model": cfg["model"]} if cfg.get("model") else {}
    texts = short_texts(256, cfg["seed"])
    perf = time.perf_counter
    statuses: dict[str, int] = {}
    errors: list[str] = []
    latencies: list[float] = []
    rss: list[tuple[float, float]] = []
    phase = {"timed": False, "stop": False}
    untimed = {"errors": 0}

    def note(kind: str, status: int, body: bytes) -> None:
        statuses[f"{kind} {status}"] = statuses.get(f"{kind} {status}", 0) + 1
        if not 200 <= status < 300 and len(errors) < 20:
            errors.append(f"{kind} {status}: {body[:200]!r}")

    async def call(conn: HTTPConnection, kind: str, raw: bytes) -> tuple[int, bytes]:
        start = perf()
        try:
            status, body = await conn.send(raw)
        except OSError as exc:
            status, body = -1, str(exc).encode()
        if phase["timed"]:
            note(kind, status, body)
            if 200 <= status < 300:
                latencies.append(perf() - start)
        elif not 200 <= status < 300:  # warm-up, or the requests in flight when time is up
            untimed["errors"] += 1
            if len(errors) < 20:
                errors.append(f"untimed {kind} {status}: {body[:200]!r}")
        return status, body

    async def client(worker: int) -> None:
        conn = HTTPConnection(url)
        post = conn.request_bytes
        session: str | None = None
        cycle = 0
        try:
            while not phase["stop"]:
                if session is None or cycle % SESSION_CYCLES == 0:
                    if session is not None:
                        await call(conn, "delete", conn.request_bytes("DELETE", f"/v1/sessions/{session}"))
                    status, body = await call(conn, "create", post("POST", "/v1/sessions", json.dumps(
                        {"text": texts[worker % len(texts)], **extra}).encode()))
                    session = json.loads(body)["session_id"] if 200 <= status < 300 else None
                for step in range(8):
                    text = texts[(worker * 8 + cycle * 3 + step) % len(texts)]
                    if step < 5:
                        await call(conn, "predict", post("POST", "/v1/predict",
                                                         json.dumps({"text": text, **extra}).encode()))
                    elif step < 7 and session is not None:
                        word = WORDS[(worker + cycle * 2 + step) % len(WORDS)]
                        await call(conn, "update", post("POST", f"/v1/sessions/{session}/text",
                                                        json.dumps({"text": word + " "}).encode()))
                    elif step == 7 and cycle % 2:
                        await call(conn, "generate", post("POST", "/v1/generate", json.dumps(
                            {"prompt": text, "max_words": 4, **extra}).encode()))
                    elif step == 7:
                        await call(conn, "score", post("POST", "/v1/score",
                                                       json.dumps({"text": text, **extra}).encode()))
                cycle += 1
        finally:
            await conn.close()

    async def sampler() -> None:
        while not phase["stop"]:
            if phase["timed"] and pid:
                value = rss_mb(pid)
                if value is not None:
                    rss.append((perf(), value))
            await asyncio.sleep(RSS_INTERVAL_S)

    async def clock() -> tuple[float, float | None, float | None]:
        await asyncio.sleep(cfg["warmup_s"])
        cpu0 = process_cpu_seconds(pid) if pid else None
        phase["timed"] = True
        start = perf()
        await asyncio.sleep(cfg["seconds"])
        phase["timed"] = False
        wall = perf() - start
        cpu1 = process_cpu_seconds(pid) if pid else None
        phase["stop"] = True
        return wall, cpu0, cpu1

    tasks = [asyncio.create_task(client(w)) for w in range(cfg["clients"])]
    sampling = asyncio.create_task(sampler())
    wall, cpu0, cpu1 = await clock()
    await asyncio.gather(*tasks, sampling)
    requests = sum(statuses.values())
    failed = sum(n for key, n in statuses.items() if not 200 <= int(key.rsplit(" ", 1)[1]) < 300) + untimed["errors"]
    result: dict[str, Any] = {
        "clients": cfg["clients"], "seconds": wall, "requests": requests, "errors": failed,
        "statuses": statuses, "error_samples": errors, "rps": requests / wall if wall else 0.0,
        "server_cpu_cores": (cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None and wall else None,
        "rss": [(round(t - rss[0][0], 2), round(v, 2)) for t, v in rss] if rss else [],
    }
    if latencies:
        result.update({f"p{q}_ms": percentile(latencies, q) * 1e3 for q in (50, 99)})
    return result


def _main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    result = run_async(lambda: _soak(cfg))
    print(json.dumps(result))
    return 0


def run_soak_load(url: str, *, clients: int, seconds: float, warmup_s: float, model: str | None = None,
                  server_pid: int | None = None, seed: int = 0) -> dict[str, Any]:
    """One soak in a child process; returns its JSON result."""
    cfg = {"url": url, "clients": clients, "seconds": seconds, "warmup_s": warmup_s, "model": model,
           "server_pid": server_pid, "seed": seed}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.soak", json.dumps(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=seconds + warmup_s + 180)
    if proc.returncode != 0:
        raise RuntimeError(f"soak load generator failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_halves(samples: list[tuple[float, float]]) -> dict[str, float] | None:
    """Median and peak RSS of the first and second half of the samples, and the medians' growth."""
    if len(samples) < 4:
        return None
    mid = len(samples) // 2
    first, second = [v for _, v in samples[:mid]], [v for _, v in samples[mid:]]
    m1, m2 = statistics.median(first), statistics.median(second)
    # Least-squares slope over the second half: a leak keeps climbing there, settling does not.
    times = [t for t, _ in samples[mid:]]
    slope = statistics.linear_regression(times, second).slope * 60 if len(set(times)) > 1 else 0.0
    return {"first_median_mb": m1, "second_median_mb": m2, "first_peak_mb": max(first),
            "second_peak_mb": max(second), "growth_mb": m2 - m1, "growth": (m2 - m1) / m1,
            "second_half_mb_per_min": slope}


# --------------------------------------------------------------------------- section: soak


def run_soak(ctx: Context) -> list[Row]:
    card = ctx.card
    seconds, warmup = ctx.pick(SECONDS, 10.0), ctx.pick(WARMUP_SECONDS, 3.0)
    service = ctx.servers.service("soak")
    log(f"soak: {CLIENTS} clients for {seconds:g} s (after {warmup:g} s of warm-up)")
    res = run_soak_load(service.url, clients=CLIENTS, seconds=seconds, warmup_s=warmup, model=card.name,
                        server_pid=service.pid, seed=ctx.seed)
    ctx.servers.release("soak")
    halves = rss_halves([tuple(s) for s in res["rss"]])
    log(f"soak: {res['requests']} requests, {res['errors']} errors, RSS {halves}")
    ctx.shared["soak"] = res
    mix = "5 predict : 2 session updates : 1 score or generate, sessions recreated every 50 cycles"
    p = (f"; p50 {res['p50_ms']:.1f} / p99 {res['p99_ms']:.1f} ms" if "p50_ms" in res else "")
    cpu = f"; server {res['server_cpu_cores']:.2f} cores busy" if res.get("server_cpu_cores") is not None else ""
    rows = [Row(
        "soak", f"{CLIENTS} clients for {res['seconds']:.0f} s, mixed requests ({mix})", res["errors"], "errors",
        target=f"{TARGET_ERRORS} errors", met=res["errors"] <= TARGET_ERRORS,
        display=f"{res['errors']} errors in {res['requests']:,} requests ({res['rps']:.0f} req/s{p}{cpu})",
        note="; ".join(res["error_samples"][:3]),
        details={k: v for k, v in res.items() if k != "rss"},
    )]
    if halves is None:
        rows.append(Row("soak", "server RSS, second half vs first half", None, display="not measured",
                        target=f"≤ +{TARGET_GROWTH:.0%}", note="no /proc RSS samples of the server"))
        return rows
    rows.append(Row(
        "soak", "server RSS, second half vs first half (medians)", halves["growth"] * 100, "%",
        target=f"≤ +{TARGET_GROWTH:.0%}", met=at_most(halves["growth"], TARGET_GROWTH),
        display=(f"{halves['growth_mb']:+.1f} MB ({halves['first_median_mb']:.1f} → {halves['second_median_mb']:.1f} "
                 f"MB; peaks {halves['first_peak_mb']:.1f} → {halves['second_peak_mb']:.1f} MB; second half "
                 f"{halves['second_half_mb_per_min']:+.2f} MB/min; {len(res['rss'])} samples)"),
        details={**halves, "samples": res["rss"]},
    ))
    return rows


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
