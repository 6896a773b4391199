"""The Grafana dashboard against the real thing: every query it makes returns data.

Starts, natively and on loopback: redis-server; two uvicorn replicas of ``service.main:app``
sharing it as their session store (the docker-compose.yml deployment) and a third keeping its
sessions in memory (the ``make serve`` deployment, the store with an LRU bound); Prometheus
scraping all of them every second. Drives traffic through every feature (predictions, scoring,
client errors, generation, sessions with evictions, expiries and finally a store failure), then
evaluates every ``targets[].expr`` of ``deploy/grafana/dashboards/nextword.json`` through
Prometheus' HTTP API: each must return a non-empty result, and every metric a panel names must
be one the replicas export. Skips without the redis-server and prometheus binaries.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import Process, free_port  # noqa: E402
from test_packaging import DASHBOARD, PROMQL_BUILTIN_METRICS, dashboard_exprs, metric_names  # noqa: E402

httpx = pytest.importorskip("httpx")

# Under load (2 cores, a training run beside it) exporting the shared models, starting four
# servers and evaluating ~30 queries takes minutes: more than the suite's default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
APP = "service.main:app"
REDIS_REPLICAS = 2
RATE_WINDOW = "15s"
# Grafana's built-in variables, as Grafana would expand them for a short time range at 1 s scrapes.
GRAFANA_VARIABLES = {
    "__rate_interval": RATE_WINDOW,
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
STARTUP_TIMEOUT = 180.0  # replicas on a loaded 2-core machine load a model and self-check
QUERY_DEADLINE = 45.0  # after the traffic: rate() needs two scrapes of every new series
SESSION_TTL_SECONDS = 3
MAX_SESSIONS = 4
TINY_WORDS = (
    "the a of and to in is was he it that for on with as his they at by this had not are but from "
    "or have an she which one you were her all we there been has when who will more no if out so"
)


# ---------------------------------------------------------------- processes


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, processes: list[Process], interval: float = 0.25
) -> None:
    """Poll ``check`` until true; fail early (with its log) when a process it waits on died."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in processes:
            if not proc.alive():
                pytest.fail(
                    f"{proc.name} exited with {proc.proc.returncode} while waiting for {what}:\n{proc.log_tail()}"
                )
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.log_tail(1500)}" for p in processes)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(interval)


def redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


# ---------------------------------------------------------------- the model repository


def _tiny_repository(directory: Path) -> Path:
    """A small real model version, exported the way training exports every model."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("training.export") is None:
        pytest.skip("training.export is not available to build a model repository")
    import torch

    from nextword.text import SPECIAL_TOKENS
    from nextword.vocab import Vocab
    from training.export import export_model
    from training.model import LanguageModel, ModelConfig

    vocab = Vocab([*SPECIAL_TOKENS, *dict.fromkeys(TINY_WORDS.split())])
    torch.manual_seed(0)
    model = LanguageModel(
        ModelConfig(vocab_size=len(vocab), cell="lstm", embedding_size=16, hidden_size=16, num_layers=1, tied=True)
    )
    export_model(model, vocab, directory, "tiny", 1)
    return directory


def model_repository_for(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The service tests' shared ``model_repository`` fixture when there is one, else our own."""
    try:
        return Path(request.getfixturevalue("model_repository"))
    except pytest.FixtureLookupError:
        return _tiny_repository(tmp_path / "models")


# ---------------------------------------------------------------- the stack


@dataclass
class Replica:
    name: str
    store: str  # "redis" or "memory"
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Stack:
    """redis-server, the replicas and Prometheus. The two Redis-backed replicas are the
    docker-compose.yml deployment; a third one keeps sessions in memory (``make serve``), the
    only store with an LRU bound, so the eviction series exist too."""

    def __init__(self, tmp_path: Path, repository: Path) -> None:
        self.tmp = tmp_path
        self.repository = repository
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.processes: list[Process] = []
        self.redis: Process | None = None
        self.redis_port = free_port()
        self.replicas = [Replica(f"nextword-{i}", "redis", free_port()) for i in range(1, REDIS_REPLICAS + 1)]
        self.replicas.append(Replica("nextword-memory", "memory", free_port()))
        self.prometheus_port = free_port()

    @property
    def replica_urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def urls(self, store: str) -> list[str]:
        return [r.url for r in self.replicas if r.store == store]

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def start(self) -> None:
        self.redis = self._spawn(
            "redis",
            [
                shutil.which("redis-server"),
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--dir",
                str(self.tmp),
            ],
        )
        wait_for("redis", lambda: redis_ping(self.redis_port), 30, [self.redis])

        processes = []
        for replica in self.replicas:
            store = f"redis://127.0.0.1:{self.redis_port}/0" if replica.store == "redis" else "memory"
            env = {
                **os.environ,
                "NEXTWORD_MODEL_REPOSITORY": str(self.repository),
                "NEXTWORD_SESSION_STORE": store,
                "NEXTWORD_SESSION_TTL_SECONDS": str(SESSION_TTL_SECONDS),
                "NEXTWORD_MAX_SESSIONS": str(MAX_SESSIONS),
                "NEXTWORD_DEVICE": "cpu",
                "NEXTWORD_INTRA_OP_THREADS": "1",
                "NEXTWORD_RELOAD_INTERVAL_SECONDS": "0",
                "NEXTWORD_HOST": "127.0.0.1",
                "NEXTWORD_PORT": str(replica.port),
                "NEXTWORD_LOG_LEVEL": "warning",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            }
            processes.append(
                self._spawn(
                    replica.name,
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        APP,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(replica.port),
                        "--log-level",
                        "warning",
                        "--no-access-log",
                    ],
                    env=env,
                    cwd=ROOT,
                )
            )

        config = self.tmp / "prometheus.yml"
        targets = ", ".join(f'"127.0.0.1:{r.port}"' for r in self.replicas)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: nextword\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
            f"    static_configs:\n      - targets: [{targets}]\n",
            encoding="utf-8",
        )
        prometheus = self._spawn(
            "prometheus",
            [
                shutil.which("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                "--log.level=warn",
            ],
            cwd=self.tmp,
        )

        for proc, replica in zip(processes, self.replicas, strict=True):
            wait_for(
                f"{proc.name} /readyz",
                lambda url=replica.url: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
                STARTUP_TIMEOUT,
                [proc],
            )
        wait_for(
            "prometheus /-/ready",
            lambda: httpx.get(f"{self.prometheus_url}/-/ready", timeout=5).is_success,
            60,
            [prometheus],
        )

    def _spawn(self, name: str, argv: list[str], **kwargs) -> Process:
        proc = Process(name, argv, self.logs, **kwargs)
        self.processes.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name} (exit {p.proc.returncode})\n{p.log_tail(2000)}" for p in self.processes)

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    missing = [binary for binary in ("redis-server", "prometheus") if shutil.which(binary) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install redis-server prometheus)")
    if importlib.util.find_spec("service") is None or importlib.util.find_spec("service.main") is None:
        pytest.skip("service.main does not exist yet")
    repository = model_repository_for(request, tmp_path)
    stack = Stack(tmp_path, repository)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# ---------------------------------------------------------------- traffic


SAMPLE_TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the"


class OpenAPI:
    """The replicas' own OpenAPI document: routes and request bodies of features (sessions,
    generation) are found there rather than hard-coded, so the test follows the API."""

    def __init__(self, document: dict) -> None:
        self.document = document
        self.paths: dict[str, dict] = document.get("paths", {})

    def find(self, method: str, pattern: str) -> list[str]:
        return sorted(p for p, ops in self.paths.items() if method.lower() in ops and re.search(pattern, p))

    def _resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            node: dict = self.document
            for part in schema["$ref"].lstrip("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def body_schema(self, method: str, path: str) -> dict | None:
        operation = self.paths[path][method.lower()]
        content = operation.get("requestBody", {}).get("content", {})
        schema = content.get("application/json", {}).get("schema")
        return self._resolve(schema) if schema else None

    def example(self, schema: dict | None, name: str = "", depth: int = 0) -> object:
        """A small valid value: required properties only, text where text goes, small numbers."""
        if schema is None:
            return None
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        for key in ("anyOf", "oneOf", "allOf"):
            if schema.get(key):
                options = [self._resolve(o) for o in schema[key] if self._resolve(o).get("type") != "null"]
                return self.example(options[0] if options else None, name, depth)
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            props = schema.get("properties", {})
            return {key: self.example(props[key], key, depth + 1) for key in schema.get("required", []) if key in props}
        if kind == "array":
            return [self.example(schema.get("items", {}), name, depth + 1)]
        if kind == "string":
            return SAMPLE_TEXT if depth <= 1 else "the"
        if kind in ("integer", "number"):
            value = 3 if kind == "integer" else 0.5
            if "minimum" in schema:
                value = max(value, schema["minimum"])
            if "exclusiveMinimum" in schema:
                value = max(value, schema["exclusiveMinimum"] + 1)
            if "maximum" in schema:
                value = min(value, schema["maximum"])
            return value
        if kind == "boolean":
            return False
        return None

    def request_body(self, method: str, path: str, **overrides: object) -> dict:
        schema = self.body_schema(method, path)
        body = self.example(schema) if schema else {}
        body = body if isinstance(body, dict) else {}
        props = (schema or {}).get("properties", {})
        body.update({k: v for k, v in overrides.items() if k in props})
        return body


def _session_id(payload: object) -> str | None:
    if isinstance(payload, dict):
        for key in ("session_id", "id", "session"):
            value = payload.get(key)
            if isinstance(value, str):
                return value
            found = _session_id(value)
            if found:
                return found
    return None


def drive_traffic(stack: Stack) -> None:
    """Exercise every feature the dashboard shows, on every replica."""
    api = OpenAPI(httpx.get(f"{stack.replica_urls[0]}/openapi.json", timeout=10).json())
    failures: list[str] = []

    def call(client: httpx.Client, method: str, path: str, expect: Callable[[int], bool], **kwargs) -> httpx.Response:
        response = client.request(method, path, **kwargs)
        if not expect(response.status_code):
            failures.append(f"{method} {client.base_url}{path} -> {response.status_code}: {response.text[:300]}")
        return response

    def ok(code: int) -> bool:
        return 200 <= code < 300

    def client_error(code: int) -> bool:
        return 400 <= code < 500

    model = httpx.get(f"{stack.replica_urls[0]}/v1/models", timeout=10).json().get("default_model")
    for url in stack.replica_urls:
        with httpx.Client(base_url=url, timeout=30) as client:
            # Stateless predictions, batches and scoring; concurrent-enough to batch a little.
            for i in range(6):
                call(client, "POST", "/v1/predict", ok, json={"text": SAMPLE_TEXT[: 10 + 7 * i], "k": 5})
            call(
                client,
                "POST",
                "/v1/predict/batch",
                ok,
                json={"items": [{"text": SAMPLE_TEXT[: 5 + 3 * i]} for i in range(12)]},
            )
            call(client, "POST", "/v1/score", ok, json={"text": SAMPLE_TEXT})
            call(client, "GET", "/v1/models", ok)
            # Client errors: 422 (invalid field), 404 (unknown model, unknown route).
            call(client, "POST", "/v1/predict", client_error, json={"text": "the", "k": 0})
            call(client, "POST", "/v1/predict", client_error, json={"tetx": "the"})
            call(client, "POST", "/v1/predict", client_error, json={"text": "the", "model": "no-such-model"})
            call(client, "GET", "/v1/no-such-route", client_error)

            # Generation, whatever its route is called (at least one form must work).
            generation = [p for p in api.find("post", r"generat|complet") if "{" not in p]
            if not generation:
                pytest.fail("the service has no generation endpoint: the generation panels cannot be checked")
            answers = []
            for path in generation:
                body = api.request_body(
                    "post",
                    path,
                    prompt=SAMPLE_TEXT,
                    text=SAMPLE_TEXT,
                    stream=False,
                    model=model,
                    max_words=5,
                    max_tokens=5,
                )
                response = client.post(path, json=body)
                answers.append(f"POST {path} {body} -> {response.status_code}: {response.text[:200]}")
                if ok(response.status_code):
                    break
            else:
                failures.append("no generation request succeeded:\n    " + "\n    ".join(answers))

    drive_sessions(stack, api, call, ok, client_error)
    assert not failures, "unexpected responses while driving traffic:\n" + "\n".join(failures)


def drive_sessions(
    stack: Stack,
    api: OpenAPI,
    call: Callable[..., httpx.Response],
    ok: Callable[[int], bool],
    client_error: Callable[[int], bool],
) -> None:
    """Sessions: on the Redis replicas (which share them) create, update and read across
    replicas, delete; on the memory replica more than NEXTWORD_MAX_SESSIONS (evictions); on
    both, sessions left past their TTL (expiries); finally Redis goes away (store errors)."""
    create = api.find("post", r"^/v1/sessions/?$")
    if not create:
        pytest.fail("the service has no POST /v1/sessions: the session panels cannot be checked")
    create_path = create[0]
    item_paths = api.find("get", r"^/v1/sessions/\{[^}]+\}/?$")
    delete_paths = api.find("delete", r"^/v1/sessions/\{[^}]+\}/?$")
    update_paths = [(m, p) for m in ("post", "put", "patch") for p in api.find(m, r"^/v1/sessions/\{[^}]+\}/.+")]
    assert update_paths, "the service has no session update route (POST /v1/sessions/{id}/...)"

    def item(path: str, sid: str) -> str:
        return re.sub(r"\{[^}]+\}", sid, path, count=1)

    def create_sessions(clients: list[httpx.Client], count: int, **overrides: object) -> list[str]:
        sessions = []
        for i in range(count):
            response = call(
                clients[i % len(clients)],
                "POST",
                create_path,
                ok,
                json=api.request_body("post", create_path, **overrides),
            )
            sid = _session_id(response.json()) if ok(response.status_code) else None
            if sid:
                sessions.append(sid)
        assert sessions, f"no session could be created on {clients[0].base_url}"
        return sessions

    def touch(client: httpx.Client, sid: str, text: str = " the cat") -> None:
        for method, path in update_paths:
            call(
                client,
                method.upper(),
                item(path, sid),
                lambda c: c < 500,
                json=api.request_body(method, path, text=text, append=text),
            )
        for path in item_paths:
            call(client, "GET", item(path, sid), lambda c: c < 500)

    shared = [httpx.Client(base_url=url, timeout=30) for url in stack.urls("redis")]
    local = httpx.Client(base_url=stack.urls("memory")[0], timeout=30)
    try:
        # Redis: more sessions than NEXTWORD_MAX_SESSIONS (the Redis store bounds them too), with
        # the short default TTL, so that some are evicted and the rest will expire.
        shortlived = create_sessions(shared, MAX_SESSIONS + 2)
        # One that outlives the TTL where the API allows (a loaded machine is slow): created on
        # one replica, updated and read on another, deleted, deleted again.
        (sid,) = create_sessions(shared[:1], 1, ttl_seconds=600)
        touch(shared[-1], sid)
        for path in item_paths:
            call(shared[0], "GET", item(path, sid), ok)
        for path in delete_paths:
            call(shared[-1], "DELETE", item(path, sid), ok)
            call(shared[0], "DELETE", item(path, sid), client_error)  # already gone
        for path in item_paths:
            call(shared[-1], "GET", item(path, "no-such-session"), client_error)

        # Memory: more sessions than the LRU bound holds.
        local_sessions = create_sessions([local], MAX_SESSIONS + 3)
        for sid in local_sessions[-2:]:
            touch(local, sid)

        # Past the TTL: the sessions still around are found expired (or reaped).
        time.sleep(SESSION_TTL_SECONDS + 1.5)
        for n, sid in enumerate(shortlived):
            touch(shared[n % len(shared)], sid, " the")
        for sid in local_sessions:
            touch(local, sid, " the")

        # The store goes away: session calls fail cleanly (5xx), predictions still work.
        assert stack.redis is not None
        stack.redis.stop()
        for client in shared:
            call(client, "POST", create_path, lambda c: c >= 500, json=api.request_body("post", create_path))
            call(client, "POST", "/v1/predict", ok, json={"text": "the"})
    finally:
        for client in [*shared, local]:
            client.close()


# ---------------------------------------------------------------- the test


def expand_grafana_variables(expr: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARIABLES[name]

    expanded = re.sub(r"\$\{(__\w+)\}|\$(__\w+)", replace, expr)
    assert not re.search(r"\$(?!\d)", expanded), f"a dashboard variable is left in {expanded!r}"
    return expanded


def exported_names(metrics_text: str) -> set[str]:
    """Series names in an exposition, plus the _bucket/_sum/_count of declared histograms."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind.strip() == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    exprs = dashboard_exprs(DASHBOARD)
    assert exprs, "the dashboard has no queries"

    # Every replica scraped a couple of times before the traffic, so that the traffic shows as
    # rates (a series whose first sample already holds the traffic has a rate of 0).
    def scraped_twice() -> bool:
        result = stack.query('count_over_time(up{job="nextword"}[1m]) >= 2 and up{job="nextword"} == 1')
        return len(result) == len(stack.replicas)

    wait_for("Prometheus to scrape every replica", scraped_twice, QUERY_DEADLINE, stack.processes)

    drive_traffic(stack)

    # Every metric a panel names is one the service exports.
    exported: set[str] = set()
    for url in stack.replica_urls:
        response = httpx.get(f"{url}/metrics", timeout=10)
        assert response.status_code == 200
        exported |= exported_names(response.text)
    unknown = {
        (title, name)
        for title, expr in exprs
        for name in metric_names(expr)
        if name not in exported and name not in PROMQL_BUILTIN_METRICS
    }
    assert not unknown, f"dashboard panels name metrics the replicas do not export: {sorted(unknown)}"

    # Every query returns data. New series need two scrapes before rate() sees them: retry.
    expanded = [(title, expr, expand_grafana_variables(expr)) for title, expr in exprs]
    deadline = time.monotonic() + QUERY_DEADLINE
    while True:
        empty = [(title, expr) for title, expr, query in expanded if not stack.query(query)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not empty, (
        "dashboard queries returned no data after traffic:\n"
        + "\n".join(f"  [{title}] {expr}" for title, expr in empty)
        + "\n"
        + stack.logs_text()
    )
