"""Section ``capacity``: the figures ``docs/scaling.md`` sizes a deployment from.

* **Keystrokes per core.** ``clients`` WebSocket sessions type a passage one character per
  message, each waiting for its reply (a keyboard that shows suggestions as you type), against
  the service with a Redis store, as deployed. Over the timed window: keystrokes answered per
  second, and per CPU-second of the service process and of ``redis-server`` (a Redis shard is
  one core). The load generator shares the machine, so the per-core figures, not the raw rate,
  are what carries over to a pod of a given size.
* **Redis per keystroke.** Commands, bytes in and bytes out (``INFO stats`` deltas over the same
  window), and Redis memory per live session (``used_memory`` delta over sessions of a few words
  and of a few hundred words: the record keeps at most ``NEXTWORD_SESSION_REBUILD_WORDS``).
* **Memory per model version.** Resident memory of a serving process with one loaded version of
  the model and with two (the same files as two versions), after requests to each.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Row, log, unavailable
from benchmarks.server import process_cpu_seconds, rss_mb, start_service
from benchmarks.texts import long_text


def _redis_stats(client: Any) -> dict[str, float]:
    info = client.info()
    return {k: float(info[k]) for k in ("total_commands_processed", "total_net_input_bytes",
                                        "total_net_output_bytes", "used_memory")}


async def _type(ws_url: str, passage: str, deadline: float, counts: list[int], start_at: float) -> None:
    """One typist: a new session over a WebSocket, then one character per message, in order."""
    from websockets.asyncio.client import connect

    async with connect(ws_url, open_timeout=30, max_size=None) as ws:
        hello = json.loads(await ws.recv())
        if hello.get("type") != "session":
            raise RuntimeError(f"stream did not open a session: {str(hello)[:200]}")
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            await ws.send(json.dumps({"seq": seq, "text": passage[seq % len(passage)]}))
            reply = json.loads(await ws.recv())
            if reply.get("type") != "predictions":
                raise RuntimeError(f"keystroke answered {str(reply)[:200]}")
            if time.monotonic() >= start_at:
                counts[0] += 1


def _keystroke_load(url: str, model: str, version: int, clients: int, warmup: float, seconds: float) -> int:
    ws_url = url.replace("http://", "ws://", 1) + f"/v1/sessions/stream?model={model}&version={version}&k=5"
    passage = long_text(400)
    counts = [0]

    async def run() -> None:
        start_at = time.monotonic() + warmup
        deadline = start_at + seconds
        await asyncio.gather(*(_type(ws_url, passage[i * 97:] + passage[:i * 97], deadline, counts, start_at)
                               for i in range(clients)))

    asyncio.run(run())
    return counts[0]


def run_capacity(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    rows += _keystrokes(ctx)
    rows += _session_memory(ctx)
    rows.append(_version_memory(ctx))
    return rows


def _keystrokes(ctx: Context) -> list[Row]:
    names = ["WebSocket keystrokes per service CPU-second", "WebSocket keystrokes per redis-server CPU-second",
             "redis commands per keystroke", "redis bytes in + out per keystroke"]
    try:
        redis = ctx.servers.redis()
        service = ctx.servers.service("redis", {"NEXTWORD_SESSION_STORE": redis.url})
    except RuntimeError as exc:
        return [unavailable("capacity", n, str(exc)[:300]) for n in names]
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    card = ctx.card
    clients, warmup, seconds = ctx.pick(32, 8), ctx.pick(3.0, 1.0), ctx.pick(20.0, 4.0)
    log(f"capacity: {clients} WebSocket typists, one character per message, {seconds:g} s")
    timed: dict[str, float] = {}

    # The window starts after the warm-up: sample the counters from a thread at that moment.
    def sample_at(when: float, key: str) -> None:
        time.sleep(max(0.0, when - time.monotonic()))
        stats = _redis_stats(client)
        timed.update({f"{key}_{k}": v for k, v in stats.items()})
        timed[f"{key}_service_cpu"] = service.cpu_seconds() or 0.0
        timed[f"{key}_redis_cpu"] = process_cpu_seconds(redis.proc.pid) or 0.0
        timed[f"{key}_time"] = time.monotonic()

    import threading

    t0 = time.monotonic()
    samplers = [threading.Thread(target=sample_at, args=(t0 + warmup, "a")),
                threading.Thread(target=sample_at, args=(t0 + warmup + seconds, "b"))]
    for thread in samplers:
        thread.start()
    try:
        keystrokes = _keystroke_load(service.url, card.name, card.version, clients, warmup, seconds)
    except Exception as exc:  # noqa: BLE001 - any failure of the load is reported as the row's reason
        for thread in samplers:
            thread.join()
        return [unavailable("capacity", n, f"{type(exc).__name__}: {str(exc)[:300]}") for n in names]
    for thread in samplers:
        thread.join()
    elapsed = timed["b_time"] - timed["a_time"]
    rate = keystrokes / elapsed
    service_cpu = timed["b_service_cpu"] - timed["a_service_cpu"]
    redis_cpu = timed["b_redis_cpu"] - timed["a_redis_cpu"]
    commands = (timed["b_total_commands_processed"] - timed["a_total_commands_processed"]) / keystrokes
    bytes_in = (timed["b_total_net_input_bytes"] - timed["a_total_net_input_bytes"]) / keystrokes
    bytes_out = (timed["b_total_net_output_bytes"] - timed["a_total_net_output_bytes"]) / keystrokes
    per_core = keystrokes / service_cpu if service_cpu else None
    per_redis_core = keystrokes / redis_cpu if redis_cpu else None
    details = {"keystrokes": keystrokes, "seconds": elapsed, "keystrokes_per_s": rate, "clients": clients,
               "service_cores_busy": service_cpu / elapsed, "redis_cores_busy": redis_cpu / elapsed,
               "redis_commands_per_keystroke": commands, "redis_bytes_in": bytes_in, "redis_bytes_out": bytes_out}
    ctx.shared["capacity"] = details
    return [
        Row("capacity", names[0], per_core, "keystrokes/CPU-s", details=details,
            display=f"{per_core:,.0f} ({rate:,.0f} keystrokes/s with the service {service_cpu / elapsed:.2f} cores "
                    f"busy, {clients} typists)" if per_core else "not measured"),
        Row("capacity", names[1], per_redis_core, "keystrokes/CPU-s",
            display=f"{per_redis_core:,.0f} (redis-server {redis_cpu / elapsed:.2f} cores busy)"
            if per_redis_core else "not measured"),
        Row("capacity", names[2], commands, "commands", display=f"{commands:.2f}"),
        Row("capacity", names[3], bytes_in + bytes_out, "bytes",
            display=f"{bytes_in + bytes_out:,.0f} ({bytes_in:,.0f} in, {bytes_out:,.0f} out)"),
    ]


def _session_memory(ctx: Context) -> list[Row]:
    """Redis memory of one session: ``MEMORY USAGE`` of its record and its seen-marker, plus its
    share of the index, over sessions made with a short and a long text."""
    names = ["redis memory per session, 10 words", "redis memory per session, 300 words"]
    try:
        redis = ctx.servers.redis()
        service = ctx.servers.service("redis", {"NEXTWORD_SESSION_STORE": redis.url})
    except RuntimeError as exc:
        return [unavailable("capacity", n, str(exc)[:300]) for n in names]
    import httpx
    import redis as redis_py

    from service.sessions.redis_store import INDEX, SEEN, SESSION

    client = redis_py.Redis.from_url(redis.url)
    card = ctx.card
    count = ctx.pick(100, 20)
    rows = []
    with httpx.Client(base_url=service.url, timeout=60) as http:
        for words, name in ((10, names[0]), (300, names[1])):
            text = long_text(words) + " "
            total = 0
            for _ in range(count):
                r = http.post("/v1/sessions", json={"model": card.name, "version": card.version, "text": text})
                r.raise_for_status()
                sid = r.json()["session_id"]
                total += sum(int(client.memory_usage(key, samples=0) or 0) for key in (SESSION + sid, SEEN + sid))
            index = int(client.memory_usage(INDEX, samples=0) or 0) / max(1, int(client.zcard(INDEX)))
            per = total / count + index
            rows.append(Row("capacity", name, per, "bytes", display=f"{per / 1024:.1f} KiB",
                            details={"sessions": count, "record_and_marker": total / count, "index_share": index}))
    ctx.shared["session_bytes"] = rows[-1].value
    return rows


def _version_memory(ctx: Context) -> Row:
    name = "resident memory per loaded model version"
    repos: dict[int, Path] = {}
    card = ctx.card
    for versions in (1, 2):
        repo = ctx.work_dir / f"capacity-repo-{versions}"
        for v in range(1, versions + 1):
            target = repo / card.name / str(v)
            if not target.exists():
                shutil.copytree(ctx.model_dir, target)
                meta = json.loads((target / "model.json").read_text())
                if meta.get("version") not in (None, v):
                    meta["version"] = v
                    (target / "model.json").write_text(json.dumps(meta))
        repos[versions] = repo
    import httpx

    rss: dict[int, float] = {}
    for versions, repo in repos.items():
        try:
            service = start_service(repo, ctx.work_dir / "logs", threads=ctx.threads)
        except RuntimeError as exc:
            return unavailable("capacity", name, str(exc)[:300])
        try:
            with httpx.Client(base_url=service.url, timeout=60) as http:
                for v in range(1, versions + 1):
                    for _ in range(20):
                        http.post("/v1/predict", json={"text": long_text(30), "model": card.name, "version": v})
            time.sleep(0.5)
            value = rss_mb(service.pid)
        finally:
            service.stop()
        if value is None:
            return unavailable("capacity", name, "no /proc/<pid>/status here")
        rss[versions] = value
    per_version = rss[2] - rss[1]
    os_share = rss[1] - per_version
    return Row("capacity", name, per_version, "MB",
               display=f"{per_version:.0f} MB (process {rss[1]:.0f} MB with one version, {rss[2]:.0f} MB with two: "
                       f"{os_share:.0f} MB is the interpreter, libraries and the service)",
               details={"rss_one_version_mb": rss[1], "rss_two_versions_mb": rss[2],
                        "workers": os.environ.get("NEXTWORD_INFERENCE_WORKERS", "default")})
