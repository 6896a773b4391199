"""Section ``keyboard``: simulated typists on WebSocket sessions, with and without the keystroke
fast path, and the cost of prefix selection.

Each typist opens its own session (``/v1/sessions/stream``) and types real sentences (the Brown
corpus, else this suite's passage) one character per message at a fixed speed (150 ms between
keystrokes by default, ~80 words a minute). The load is *open loop*: keystroke ``i`` of a typist
is sent at its scheduled time whether or not earlier answers came back, and its latency counts
from that scheduled time, so a slow server shows as latency instead of being hidden by clients
that wait. Typists start spread over one keystroke interval.

The ramp raises the number of typists N until a level misses p99 ≤ 50 ms or has an error; the
headline is the most typists served within that. Each server is warmed up first, unmeasured, by
typists typing the second half of the sentences (:data:`WARMUP_TYPISTS` for :data:`WARMUP_S`;
the typists of the levels up to 128 type only the first half), so that no level measures a
process's first calls. It made no difference to the first level, 8 typists, whose mid-word p50
was 1.01 ms with and without it, against 0.72–0.80 ms from 16 to 128: at 8 the machine idles ~19 ms
between keystrokes, and each one wakes cold cores. The service runs once with the fast path
(the default) and once with ``NEXTWORD_SESSION_ROW_CACHE_BYTES=0`` (every keystroke runs the
model) as the baseline, in the same run. A third ramp measures the floor:
``benchmarks/floor_app.py``, the same stack answering every message with a canned reply and no
work, i.e. the most typists any service of this shape can serve beside this load generator on
this machine.

The load generator is lean and in its own processes (``python -m benchmarks.keyboard <settings.json>``,
one or two, each an asyncio loop of ``websockets`` connections without compression, messages
formatted and replies read as strings): it shares the cores with the server, so its CPU time is
reported beside the server's.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Row, at_least, at_most, log, measure_interleaved, percentile, run_async
from benchmarks.server import ROOT, SERVICE_APP, process_cpu_seconds
from benchmarks.texts import PASSAGE

BROWN = ROOT.parent / "shared" / "data" / "brown"
INTERVAL_MS = 150.0
P99_MS = 50.0
TARGET_TYPISTS, TARGET_MIDWORD_P50_MS, MIDWORD_AT = 4.0, 1.0, 8
RAMP = (8, 16, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512, 640, 768, 1024)
QUICK_RAMP = (8, 32, 128, 256, 512)
CONFIGS = {"fast path": ("default", None), "fast path off": ("keys-off", {"NEXTWORD_SESSION_ROW_CACHE_BYTES": "0"})}
WARMUP_TYPISTS, WARMUP_S = 32, 6.0  # each server's unmeasured warm-up before its ramp
FLOOR_APP = "benchmarks.floor_app:app"  # the same stack answering with no work (benchmarks/floor_app.py)
TYPISTS_PER_CLIENT = 160  # past this a second client process shares the load
SENTENCES = 2000

_PUNCT_CLOSE = {".", ",", ";", ":", "?", "!", ")", "'s", "n't", "'re", "'ve", "'ll", "'d", "'m"}
_DROP = {"``", "''", "--"}


# --------------------------------------------------------------------------- the texts


def detokenize(tokens: list[str]) -> str:
    """A Brown sentence's tokens as a person would type them (quotes dropped, punctuation attached)."""
    out = ""
    for token in tokens:
        if token in _DROP:
            continue
        if out and token not in _PUNCT_CLOSE and not out.endswith("("):
            out += " "
        out += token
    return out


def sentences(seed: int, count: int = SENTENCES, root: Path = BROWN) -> tuple[list[str], str]:
    """``count`` sentences of 4 to 40 words, shuffled by ``seed``, and where they come from."""
    rng = random.Random(seed)
    try:
        from training.data import brown_files, brown_sentences

        files = brown_files(root)
        picked = [detokenize(s) for f in files for s in brown_sentences(f) if 4 <= len(s) <= 40]
        source = f"Brown corpus ({len(files)} files)"
    except Exception:  # noqa: BLE001 - no corpus here: the suite's own passage
        picked = [s.strip() + "." for s in PASSAGE.replace("\n", " ").split(".") if len(s.split()) >= 4]
        source = "the suite's passage (no Brown corpus found)"
    rng.shuffle(picked)
    return picked[:count], source


# --------------------------------------------------------------------------- the load generator process


async def _typists(cfg: dict[str, Any]) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    texts: list[str] = cfg["texts"]
    interval = cfg["interval_ms"] / 1e3
    start_at, warmup, seconds = cfg["start_at"], cfg["warmup_s"], cfg["seconds"]
    query = f"/v1/sessions/stream?k={cfg['k']}" + (f"&model={cfg['model']}&version={cfg['version']}"
                                                    if cfg.get("model") else "")
    url = cfg["url"].replace("http://", "ws://", 1) + query
    first, count = cfg["first"], cfg["count"]
    encoded = {ch: json.dumps(ch, ensure_ascii=False) for text in texts for ch in text + " "}
    midword: list[float] = []
    commits: list[float] = []
    late: list[float] = []
    errors: dict[str, int] = {}
    sent = {"n": 0}

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def typist(t: int) -> None:
        text = " ".join(texts[(t * 7 + s) % len(texts)] for s in range(64)) + " "
        offset = start_at + interval * t / cfg["total"]  # typists spread over one interval
        try:
            ws = await connect(url, compression=None, open_timeout=30)
        except Exception:  # noqa: BLE001 - a refused connection is a counted error
            error("connect")
            return
        try:
            hello = await asyncio.wait_for(ws.recv(), 30)
            if not hello.startswith('{"type":"session"'):
                error("open")
                return
            scheduled: dict[int, tuple[float, bool]] = {}
            end = start_at + seconds
            done = asyncio.Event()

            async def read() -> None:
                prefix = '{"type":"predictions","seq":'
                while scheduled or not done.is_set():
                    reply = await ws.recv()
                    now = time.time()
                    if reply.startswith(prefix):
                        seq = int(reply[len(prefix):reply.index(",", len(prefix))])
                        at, mid = scheduled.pop(seq)
                        if at >= start_at + warmup:
                            (midword if mid else commits).append(now - at)
                    else:
                        data = json.loads(reply)
                        scheduled.pop(data.get("seq"), None)
                        error(str(data.get("error", {}).get("type", "unknown")))

            reader = asyncio.create_task(read())
            i = 0
            while True:
                at = offset + i * interval
                if at >= end:
                    break
                delay = at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                ch = text[i % len(text)]
                # Inside a word: no word completes (whitespace after a non-space completes one).
                mid = not ch.isspace() or text[(i - 1) % len(text)].isspace()
                scheduled[i] = (at, mid)
                if at >= start_at + warmup:
                    sent["n"] += 1
                    late.append(time.time() - at)  # the client's own timer and loop delay
                await ws.send(f'{{"seq":{i},"text":{encoded[ch]}}}')
                i += 1
            done.set()
            if not scheduled:  # every answer is in: the reader waits for nothing more
                reader.cancel()
            try:
                await asyncio.wait_for(reader, cfg["drain_s"])
            except asyncio.CancelledError:
                pass
            except TimeoutError:
                for at, _ in scheduled.values():
                    if at >= start_at + warmup:
                        error("no answer")
        except Exception as exc:  # noqa: BLE001 - a dropped socket is a counted error
            error(type(exc).__name__)
        finally:
            await ws.close()

    tasks = [asyncio.create_task(typist(t)) for t in range(first, first + count)]

    async def cpu_window() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, start_at + warmup - time.time()))
        a = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(max(0.0, start_at + seconds - time.time()))
        b = resource.getrusage(resource.RUSAGE_SELF)
        return (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime), seconds - warmup

    cpu, window = await cpu_window()
    await asyncio.gather(*tasks)
    return {"midword": midword, "commits": commits, "late": late, "errors": errors, "sent": sent["n"],
            "client_cpu_s": cpu, "window_s": window}


def _main(argv: list[str]) -> int:
    cfg = json.loads(Path(argv[0]).read_text(encoding="utf-8"))  # a file: the texts are too long for argv
    result = run_async(lambda: _typists(cfg))
    # The result goes to a file: on stdout a result of a few hundred KB arrived cut at 64 KB.
    Path(argv[1]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def replay(url: str, typists: int, texts: list[str], *, seconds: float, warmup_s: float,
           interval_ms: float = INTERVAL_MS, model: str | None = None, version: int | None = None,
           server_pid: int | None = None, k: int = 5, clients: int | None = None) -> dict[str, Any]:
    """One level of the ramp: ``typists`` typing for ``seconds`` (the first ``warmup_s`` not
    counted), split over load-generator processes; latencies, errors and CPU of both sides."""
    clients = clients or min(max(1, math.ceil(typists / TYPISTS_PER_CLIENT)), os.cpu_count() or 1)
    connect_s = 2.0 + typists / 100  # every client connects all its typists before the start
    start_at = time.time() + connect_s
    procs, paths = [], []
    share = [typists // clients + (1 if c < typists % clients else 0) for c in range(clients)]
    first = 0
    for c in range(clients):
        cfg = {"url": url, "texts": texts, "interval_ms": interval_ms, "start_at": start_at, "warmup_s": warmup_s,
               "seconds": seconds, "first": first, "count": share[c], "total": typists, "k": k, "model": model,
               "version": version, "drain_s": 5.0}
        first += share[c]
        path = Path(tempfile.mkstemp(prefix="keyboard-", suffix=".json")[1])
        path.write_text(json.dumps(cfg), encoding="utf-8")
        result_path = path.with_suffix(".result.json")
        paths += [path, result_path]
        procs.append((subprocess.Popen([sys.executable, "-m", "benchmarks.keyboard", str(path), str(result_path)],
                                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                      result_path))
    server_cpu = None
    if server_pid:
        time.sleep(max(0.0, start_at + warmup_s - time.time()))
        cpu0 = process_cpu_seconds(server_pid)
        time.sleep(max(0.0, start_at + seconds - time.time()))
        cpu1 = process_cpu_seconds(server_pid)
        server_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    results = []
    try:
        for proc, result_path in procs:
            _, err = proc.communicate(timeout=connect_s + seconds + 120)
            if proc.returncode != 0 or not result_path.exists():
                raise RuntimeError(f"keyboard load generator failed ({proc.returncode}):\n{err[-2000:]}")
            results.append(json.loads(result_path.read_text(encoding="utf-8")))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    window = seconds - warmup_s
    midword = [x for r in results for x in r["midword"]]
    commits = [x for r in results for x in r["commits"]]
    every = midword + commits
    errors: dict[str, int] = {}
    for r in results:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    out: dict[str, Any] = {
        "typists": typists, "clients": clients, "sent": sum(r["sent"] for r in results), "answered": len(every),
        "keystrokes_per_s": len(every) / window, "errors": errors, "error_count": sum(errors.values()),
        "server_cpu_cores": server_cpu / window if server_cpu is not None else None,
        "client_cpu_cores": sum(r["client_cpu_s"] for r in results) / window, "window_s": window,
    }
    late = [x for r in results for x in r["late"]]
    for name, values in (("", every), ("midword_", midword), ("commit_", commits), ("send_late_", late)):
        if values:
            out[f"{name}p50_ms"] = percentile(values, 50) * 1e3
            out[f"{name}p99_ms"] = percentile(values, 99) * 1e3
    out["ok"] = out["error_count"] == 0 and out["answered"] > 0 and out.get("p99_ms", math.inf) <= P99_MS
    if server_cpu is not None and every:
        out["server_cpu_ms_per_keystroke"] = server_cpu / len(every) * 1e3
    return out


# --------------------------------------------------------------------------- the section


def _ramp(ctx: Context, key: str, env: dict[str, str] | None, texts: list[str],
          app: str = SERVICE_APP) -> list[dict[str, Any]]:
    card = ctx.card
    service = ctx.servers.service(key, env, app=app)
    # Unmeasured, on the second half of the sentences: what the first levels' typists type is no
    # more familiar to the server than a running service's common fragments are.
    replay(service.url, WARMUP_TYPISTS, texts[len(texts) // 2:], seconds=ctx.pick(WARMUP_S, 2.0),
           warmup_s=0.0, model=card.name, version=card.version)
    levels = []
    for n in ctx.pick(RAMP, QUICK_RAMP):
        for attempt in (1, 2):  # a level that misses is run once more: one hiccup of a shared machine
            m = replay(service.url, n, texts, seconds=ctx.pick(10.0, 4.0), warmup_s=ctx.pick(2.0, 1.0),
                       model=card.name, version=card.version, server_pid=service.pid)
            m["attempt"] = attempt
            if m["ok"]:
                break
        levels.append(m)
        log(f"keyboard {key}: {n} typists → {m['keystrokes_per_s']:.0f} keystrokes/s, p50 {m.get('p50_ms', 0):.2f} / "
            f"p99 {m.get('p99_ms', 0):.1f} ms, {m['error_count']} errors, server {m['server_cpu_cores'] or 0:.2f} + "
            f"client {m['client_cpu_cores']:.2f} cores")
        if not m["ok"]:
            break
    return levels


def _served(levels: list[dict[str, Any]]) -> int:
    """The most typists of a passing level below the first failing one."""
    best = 0
    for m in levels:
        if not m["ok"]:
            break
        best = m["typists"]
    return best


def _level(levels: list[dict[str, Any]], typists: int) -> dict[str, Any]:
    """The ramp's level of ``typists`` ({} when the ramp did not run it)."""
    return next((m for m in levels if m["typists"] == typists), {})


def _ran_out(levels: list[dict[str, Any]]) -> bool:
    """Whether the ramp ended at its last level without missing (the ramp stops at a miss)."""
    return bool(levels[-1]["ok"])


def _cpu_ms(levels: list[dict[str, Any]], typists: int) -> float | None:
    return _level(levels, typists).get("server_cpu_ms_per_keystroke")


def _limit_note(ramps: dict[str, list[dict[str, Any]]], floor_levels: list[dict[str, Any]], on: int,
                off: int) -> str:
    """What limits the ratio, from this run: the server's CPU per keystroke of both services at
    the same loads, against the floor's."""
    fast, base = ramps["fast path"], ramps["fast path off"]
    low = RAMP[0]
    parts = []
    b_low, f_low, b_off, f_off = _cpu_ms(base, low), _cpu_ms(fast, low), _cpu_ms(base, off), _cpu_ms(fast, off)
    if None not in (b_low, f_low, b_off, f_off):
        parts.append(f"server CPU per keystroke, fast path vs off: {f_low:.2f} vs {b_low:.2f} ms at {low} typists, "
                     f"{f_off:.2f} vs {b_off:.2f} ms at {off}: batching makes the model's share of a keystroke "
                     "small under load, so skipping it saves less the busier the server")
    f_on, floor_on = _cpu_ms(fast, on), _cpu_ms(floor_levels, on)
    if f_on is not None and floor_on is not None:
        parts.append(f"at {on} typists the fast path spends {f_on:.2f} ms per keystroke, the stack alone "
                     f"{floor_on:.2f}: the rest is selection, corrections, session and model work of the service")
    return "; ".join(parts)


def _level_row(label: str, m: dict[str, Any]) -> Row:
    cpu = ""
    if m["server_cpu_cores"] is not None:
        cpu = (f"; server {m['server_cpu_cores']:.2f} cores ({m.get('server_cpu_ms_per_keystroke', 0):.2f} ms per "
               f"keystroke) + load generator {m['client_cpu_cores']:.2f}")
    errors = ", ".join(f"{n} {kind}" for kind, n in m["errors"].items()) or "0"
    latency = (f"p50 {m['p50_ms']:.2f} / p99 {m['p99_ms']:.1f} ms (mid-word p50 {m.get('midword_p50_ms', 0):.2f}, "
               f"word-completing p50 {m.get('commit_p50_ms', 0):.2f} ms; sent p50 "
               f"{m.get('send_late_p50_ms', 0):.2f} ms after their scheduled time)" if "p50_ms" in m else "no answers")
    return Row("keyboard", f"{label}, {m['typists']} typists", m["keystrokes_per_s"], "keystrokes/s",
               display=f"{m['keystrokes_per_s']:.0f} keystrokes/s; {latency}; errors {errors}{cpu}",
               note="" if m["ok"] else f"over the bar (p99 ≤ {P99_MS:g} ms, no errors) twice: the ramp stops here",
               details=m)


def prefix_selection(ctx: Context, texts: list[str]) -> Row:
    """Top-5 among the words starting with 1-, 2- and 3-letter fragments of the typed words, on a
    real next-word row, against the whole vocabulary."""
    import numpy as np

    from nextword.vocab import Vocab
    from service.engine.vocab_index import VocabIndex

    card = ctx.card
    index = VocabIndex(Vocab.load(ctx.model_dir / card.vocab_file))
    rng = np.random.default_rng(ctx.seed)
    row = np.log(rng.dirichlet(np.full(card.vocab_size, 0.05))).astype(np.float32)
    ranked = index.arrange(row)  # done once per row; a word's keystrokes all select from it
    words = [w.lower() for t in texts[:400] for w in t.split() if w.isalpha() and len(w) >= 3]
    fragments = {n: [w[:n] for w in words] for n in (1, 2, 3)}
    cycle = {n: 0 for n in fragments}

    def select(n: int) -> None:
        frags = fragments[n]
        index.top_k_ranked(ranked, 5, frags[cycle[n] % len(frags)])
        cycle[n] += 1

    fns = {f"{n} letter{'s' if n > 1 else ''}": (lambda n=n: select(n)) for n in fragments}
    fns["whole vocabulary"] = lambda: index.top_k_ranked(ranked, 5, "")
    t = measure_interleaved(fns, repeats=ctx.pick(7, 3), min_time=ctx.pick(0.1, 0.02), settle=0.0)
    def size(fragment: str) -> int:
        lo, hi = index.prefix_range(fragment)
        return hi - lo

    matches = {n: statistics.fmean(size(f) for f in frags) for n, frags in fragments.items()}
    parts = [f"{n} letter{'s' if n > 1 else ''} {t[name].median * 1e6:.0f} µs ({matches[n]:.0f} words)"
             for n, name in zip(fragments, list(fns)[:3], strict=True)]
    whole = t["whole vocabulary"].median * 1e6
    return Row("keyboard", "prefix selection (top-5 among the words starting with the fragment)",
               t["3 letters"].median * 1e6, "µs",
               display="; ".join(parts) + f"; whole vocabulary ({card.vocab_size:,} words) {whole:.0f} µs",
               note="only the fragment's range of the sorted vocabulary is read; mean words per fragment in brackets",
               details={**{k: v.summary() for k, v in t.items()}, "mean_matches": matches})


def run_keyboard(ctx: Context) -> list[Row]:
    texts, source = sentences(ctx.seed)
    log(f"keyboard: typists type {len(texts)} sentences of {source}, one character per message every "
        f"{INTERVAL_MS:g} ms")
    rows = [prefix_selection(ctx, texts)]
    ramps: dict[str, list[dict[str, Any]]] = {}
    for label, (key, env) in CONFIGS.items():
        log(f"keyboard: {label}")
        ramps[label] = _ramp(ctx, key, env, texts)
        if key != "default":
            ctx.servers.release(key)
    log("keyboard: the stack's floor (benchmarks/floor_app.py: the same WebSocket route answered with no work)")
    floor_levels = _ramp(ctx, "floor", None, texts, app=FLOOR_APP)
    ctx.servers.release("floor")
    on, off = _served(ramps["fast path"]), _served(ramps["fast path off"])
    floor = _served(floor_levels)
    ratio = on / off if off else None
    notes = [f"the ramp ended at {on} typists without missing" if _ran_out(ramps["fast path"]) else "",
             "" if off else f"the baseline missed the bar at the ramp's first level ({RAMP[0]} typists): no ratio",
             _limit_note(ramps, floor_levels, on, off) if ratio is not None and ratio < TARGET_TYPISTS else ""]
    ratio_text = f"{ratio:.2f}× " if ratio is not None else ""
    rows.append(Row(
        "keyboard", f"typists served at p99 ≤ {P99_MS:g} ms with no errors, fast path vs off", ratio, "×",
        target=f"≥ {TARGET_TYPISTS:g}×", met=at_least(ratio, TARGET_TYPISTS),
        display=f"{ratio_text}({on} vs {off} typists at one keystroke per {INTERVAL_MS:g} ms)",
        note="; ".join(n for n in notes if n),
        details={"fast_path_typists": on, "baseline_typists": off, "text": source},
    ))
    floor_text = f"{'at least ' if _ran_out(floor_levels) else ''}{floor} typists"
    if off and floor:
        floor_text += f": {floor / off:.2f}× the baseline's {off}; the fast path serves {on / floor:.0%} of it"
    rows.append(Row(
        "keyboard", f"typists served at p99 ≤ {P99_MS:g} ms with no errors by the stack alone (the floor)", floor,
        "typists", display=floor_text,
        note="FastAPI + uvicorn answering each message with a canned reply of the same size (JSON in, JSON out, no "
             "session, model or selection) beside the same load generator: no service built on this stack serves "
             "more typists on this machine",
        details={"floor_typists": floor, "levels": floor_levels},
    ))
    at8 = _level(ramps["fast path"], MIDWORD_AT)
    mid, late = at8.get("midword_p50_ms"), at8.get("send_late_p50_ms")
    rows.append(Row(
        "keyboard", f"mid-word keystroke p50 at {MIDWORD_AT} typists, fast path", mid, "ms",
        target=f"≤ {TARGET_MIDWORD_P50_MS:g} ms", met=at_most(mid, TARGET_MIDWORD_P50_MS),
        display=f"{mid:.2f} ms" if mid is not None else "not measured",
        note="" if mid is None or mid <= TARGET_MIDWORD_P50_MS or late is None else
        f"counted from the scheduled time: the load generator itself sent p50 {late:.2f} ms late (its event "
        "loop's timers wake with millisecond granularity, later on a busy machine)",
    ))
    for label, levels in (*ramps.items(), ("floor", floor_levels)):
        rows += [_level_row(f"keyboard, {label}", m) for m in levels]
    ctx.shared["keyboard"] = ramps
    return rows


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
