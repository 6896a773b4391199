"""Processes the benchmarks start themselves: uvicorn serving the model under test, and redis.

Each gets a free port, a log file in the run's work directory and its own process group; start-up
polls for readiness (``/readyz`` for uvicorn, ``PING`` for redis) and stop sends SIGTERM to the
group, then SIGKILL. The service is served from a private repository that holds only the model
version under test (a symlink), so nothing else loads and nothing reloads mid-measurement.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import log

ROOT = Path(__file__).resolve().parents[1]


SERVICE_APP = "service.main:app"  # what uvicorn serves unless a benchmark names another app


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its threads (Linux ``/proc``), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (Linux ``/proc``), else None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@dataclass
class Service:
    url: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        _stop_group(self.proc)


def private_repository(model_dir: Path, work_dir: Path) -> Path:
    """``work_dir/repo/<name>/<version>`` → the model version under test (symlink; a copy where
    symlinks are not possible)."""
    from nextword.artifact import read_card

    card = read_card(model_dir)
    repo = work_dir / "repo"
    target = repo / card.name / str(card.version)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(model_dir.resolve(), target_is_directory=True)
        except OSError:
            shutil.copytree(model_dir, target)
    return repo


def start_service(repository: Path, log_dir: Path, env: dict[str, str] | None = None, *, threads: int,
                  timeout: float = 120.0, app: str = SERVICE_APP) -> Service:
    """``python -m uvicorn service.main:app`` (or another ``app``) on a free port, ready when
    ``/readyz`` says 200."""
    import httpx

    port = free_port()
    full_env = {
        **os.environ,
        "NEXTWORD_MODEL_REPOSITORY": str(repository),
        "NEXTWORD_DEVICE": "cpu",
        "NEXTWORD_INTRA_OP_THREADS": str(threads),
        "NEXTWORD_RELOAD_INTERVAL_SECONDS": "0",
        "NEXTWORD_LOG_LEVEL": "warning",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log"]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"uvicorn-{port}.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(argv, env=full_env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    service = Service(f"http://127.0.0.1:{port}", proc, log_path, {k: v for k, v in full_env.items()
                                                                  if k.startswith("NEXTWORD_")})
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{service.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(service.url + "/readyz", timeout=2).status_code == 200:
                return service
        if time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(f"uvicorn not ready after {timeout:.0f}s:\n{service.log_tail()}")
        time.sleep(0.1)


@dataclass
class Redis:
    url: str
    proc: subprocess.Popen

    def stop(self) -> None:
        _stop_group(self.proc)


def start_redis(log_dir: Path, timeout: float = 20.0) -> Redis:
    """``redis-server --port P --save '' --appendonly no`` (no persistence: nothing touches disk)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"redis-{port}.log").open("wb") as fh:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no"], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return Redis(f"redis://127.0.0.1:{port}/0", proc)
        if time.monotonic() > deadline:
            _stop_group(proc)
            raise RuntimeError(f"redis-server not answering on port {port} after {timeout:.0f}s")
        time.sleep(0.05)


class ServerPool:
    """Services keyed by configuration, started on first use and stopped together at the end."""

    def __init__(self, model_dir: Path, work_dir: Path, threads: int) -> None:
        self.model_dir = model_dir
        self.work_dir = work_dir
        self.threads = threads
        self.repository = private_repository(model_dir, work_dir)
        self._services: dict[str, Service] = {}
        self._redis: Redis | None = None

    def service(self, key: str = "default", env: dict[str, str] | None = None, app: str = SERVICE_APP) -> Service:
        if key not in self._services:
            log(f"starting uvicorn ({key}{', ' + str(env) if env else ''})")
            self._services[key] = start_service(self.repository, self.work_dir / "logs", env, threads=self.threads,
                                                app=app)
        return self._services[key]

    def release(self, key: str) -> None:
        service = self._services.pop(key, None)
        if service is not None:
            service.stop()

    def redis(self) -> Redis:
        if self._redis is None:
            log("starting redis-server")
            self._redis = start_redis(self.work_dir / "logs")
        return self._redis

    def stop_all(self) -> None:
        for key in list(self._services):
            self.release(key)
        if self._redis is not None:
            self._redis.stop()
            self._redis = None


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def series_sum(text: str, names: set[str], labels: dict[str, str] | None = None) -> float:
    """Sum of the samples in Prometheus exposition ``text`` named one of ``names`` whose labels
    include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] in names:
            have = dict(_LABEL.findall(match["labels"] or ""))
            if all(have.get(k) == v for k, v in (labels or {}).items()):
                total += float(match["value"])
    return total


def counter_total(text: str, metric: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a Prometheus counter's series (``<metric>_total`` or ``<metric>``) whose labels include ``labels``."""
    return series_sum(text, {metric, f"{metric}_total"}, labels)


def tokens_fed(url: str, model: str) -> float:
    """Tokens the service has fed through ``model`` so far (``nextword_tokens_total``, all graphs)."""
    import httpx

    return counter_total(httpx.get(url + "/metrics", timeout=10).text, "nextword_tokens", {"model": model})


def histogram_totals(text: str, metric: str, labels: dict[str, str] | None = None) -> tuple[float, float]:
    """``(sum, count)`` of a Prometheus histogram in exposition ``text``, over the series whose
    labels include ``labels``."""
    return series_sum(text, {f"{metric}_sum"}, labels), series_sum(text, {f"{metric}_count"}, labels)


def batch_histogram(url: str, model: str) -> tuple[float, float]:
    import httpx

    return histogram_totals(httpx.get(url + "/metrics", timeout=10).text, "nextword_batch_size", {"model": model})
