"""Static checks of the packaging and deployment files: pyproject.toml, the Dockerfiles,
docker-compose.yml and everything under deploy/. Fast; starts no process."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
NGINX_CONFIG = ROOT / "deploy" / "nginx" / "nginx.conf"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "nextword.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
}
PROMQL_BUILTIN_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ---------------------------------------------------------------- helpers (also used by test_dashboard)


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query target of every panel, nested rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(json.loads(path.read_text(encoding="utf-8"))["panels"])
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small tokenizer: enough for dashboards)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range / subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        name = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("(") or name.lower() in PROMQL_KEYWORDS:
            continue  # function or aggregation, or a keyword
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the unit or exponent of a number literal: 1e3, 15s
        names.add(name)
    return names


def documented_metrics() -> dict[str, str]:
    """``{name: type}`` from the table in docs/metrics.md."""
    found = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"`nextword_[a-z0-9_]+`", cells[0]):
            found[cells[0].strip("`")] = cells[1].split()[0]
    return found


def allowed_series(documented: dict[str, str]) -> set[str]:
    allowed = set(PROMQL_BUILTIN_METRICS)
    for name, kind in documented.items():
        allowed.add(name)
        if kind == "histogram":
            allowed.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    return allowed


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, rest = 0.0, str(text)
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", rest):
        total += float(number) * units[unit]
    assert total > 0, f"cannot parse duration {text!r}"
    return total


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def replicas(services) -> dict[str, dict]:
    """The nextword service replicas: the services built from the project's Dockerfile."""
    return {name: svc for name, svc in services.items() if isinstance(svc.get("build"), dict | str)}


@pytest.fixture(scope="module")
def prometheus_config() -> dict:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _healthcheck_command(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def _depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (cond or {}).get("condition", "service_started") for name, cond in deps.items()}


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def _published_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["published"]))
        else:
            parts = str(port).split(":")
            ports.add(int(parts[-2] if len(parts) >= 2 else parts[-1]))
    return ports


# ---------------------------------------------------------------- pyproject.toml


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_base_install_is_torch_free(pyproject):
    project = pyproject["project"]
    assert project["name"] == "nextword"
    assert project["requires-python"].replace(" ", "") == ">=3.11"
    names = {_requirement_name(r) for r in project["dependencies"]}
    assert not names & {"torch", "onnx", "onnxscript", "tqdm", "matplotlib"}, names
    for needed in (
        "fastapi",
        "uvicorn",
        "onnxruntime",
        "numpy",
        "prometheus-client",
        "redis",
        "pydantic-settings",
        "websockets",
    ):
        assert needed in names, f"{needed} missing from the base dependencies"
    assert any(r.replace(" ", "").startswith("uvicorn[standard]") for r in project["dependencies"])


def test_pyproject_extras(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    train = [r.replace(" ", "") for r in extras["train"]]
    assert "torch==2.13.0" in train, "torch must be pinned exactly (a range pulls a CUDA build)"
    assert {"onnx", "onnxscript", "tqdm", "matplotlib"} <= {_requirement_name(r) for r in train}
    assert {_requirement_name(r) for r in extras["gpu"]} == {"onnxruntime-gpu"}
    dev = {_requirement_name(r) for r in extras["dev"]}
    assert {"pytest", "pytest-timeout", "httpx", "hypothesis", "ruff", "pyyaml"} <= dev
    for extra, requirements in extras.items():
        if extra != "train":
            assert "torch" not in {_requirement_name(r) for r in requirements}, extra


def test_pyproject_scripts_and_packages(pyproject):
    scripts = pyproject["project"]["scripts"]
    assert scripts["nextword-serve"] == "service.cli:main"
    assert scripts["nextword-train"] == "training.cli:main"
    assert scripts["nextword-bench"] == "benchmarks.__main__:main"
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in ("nextword", "service", "training", "benchmarks"):
        assert any(re.fullmatch(pattern.replace(".", r"\.").replace("*", ".*"), package) for pattern in include)


def test_pyproject_tool_config(pyproject):
    ruff = pyproject["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert ruff["target-version"] == "py311"
    assert {"E", "F", "W", "I", "B", "UP", "SIM"} <= set(ruff["lint"]["select"])
    pytest_cfg = pyproject["tool"]["pytest"]["ini_options"]
    assert pytest_cfg["testpaths"] == ["tests"]
    markers = {m.split(":")[0].strip() for m in pytest_cfg["markers"]}
    assert {"slow", "e2e"} <= markers
    assert int(pytest_cfg["timeout"]) > 0


# ---------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_serves_torch_free_as_non_root(name):
    path = ROOT / name
    if not path.exists():
        pytest.skip(f"no {name}")
    instructions = dockerfile_instructions(path)
    runs = [args for kw, args in instructions if kw == "RUN"]
    for args in runs:
        for install in re.findall(r"pip3? install([^&;|]*)", args):
            assert "torch" not in install and "train" not in install, f"{name} installs {install.strip()!r}"
    copies = " ".join(args for kw, args in instructions if kw == "COPY")
    assert "training" not in copies and "benchmarks" not in copies
    for needed in ("nextword/", "service/", "models/"):
        assert needed in copies, f"{name} does not copy {needed}"
    users = [args.split(":")[0] for kw, args in instructions if kw == "USER"]
    assert users and users[-1] not in {"root", "0"}, f"{name} must end as a non-root USER"
    env = " ".join(args for kw, args in instructions if kw == "ENV")
    assert re.search(r"NEXTWORD_HOST[= ]0\.0\.0\.0", env)
    assert any(kw == "EXPOSE" and "8000" in args.split() for kw, args in instructions)
    healthchecks = [args for kw, args in instructions if kw == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/readyz" in healthchecks[0]
    assert "curl" not in healthchecks[0] and "urllib" in healthchecks[0]
    cmd = [args for kw, args in instructions if kw == "CMD"][-1]
    assert "nextword-serve" in cmd


def test_dockerignore_keeps_models_and_drops_venvs():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    assert ".venv" in lines and ".git" in lines
    assert not {"models", "models/", "nextword", "service"} & lines


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_topology(services, replicas):
    assert {"redis", "lb", "prometheus", "grafana"} <= set(services)
    assert len(replicas) >= 2, "at least two nextword replicas"
    assert services["redis"]["image"].startswith("redis:7")
    assert services["lb"]["image"].startswith("nginx")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_replicas(replicas):
    for name, svc in replicas.items():
        build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
        context = ROOT / build.get("context", ".")
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        env = _environment(svc)
        assert env["NEXTWORD_SESSION_STORE"].startswith("redis://redis:6379"), name
        assert env.get("NEXTWORD_HOST", "0.0.0.0") == "0.0.0.0"
        assert env.get("NEXTWORD_PORT", "8000") == "8000"
        assert "/readyz" in _healthcheck_command(svc), name
        assert "curl" not in _healthcheck_command(svc), "the image has no curl"
        assert _depends_on(svc).get("redis") == "service_healthy", name
        assert not _published_ports(svc), f"{name} is reached through lb, not published"


def test_compose_healthchecks_and_ordering(services, replicas):
    assert "redis-cli" in _healthcheck_command(services["redis"])
    assert "ping" in _healthcheck_command(services["redis"])
    lb_deps = _depends_on(services["lb"])
    for name in replicas:
        assert lb_deps.get(name) == "service_healthy", f"lb must wait for {name} to be healthy"
    prometheus_deps = _depends_on(services["prometheus"])
    assert set(replicas) <= set(prometheus_deps)
    assert "prometheus" in _depends_on(services["grafana"])


def test_compose_ports(services):
    assert 8000 in _published_ports(services["lb"])
    assert 3000 in _published_ports(services["grafana"])
    assert 9090 in _published_ports(services["prometheus"])
    assert not _published_ports(services["redis"])


def test_compose_bind_mounts_exist(services):
    mounts = [(name, src, dst) for name, svc in services.items() for src, dst in _bind_mounts(svc)]
    assert mounts
    for name, source, _ in mounts:
        assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
    targets = {(name, dst): src for name, src, dst in mounts}
    assert targets[("lb", "/etc/nginx/nginx.conf")].endswith("deploy/nginx/nginx.conf")
    assert targets[("prometheus", "/etc/prometheus/prometheus.yml")].endswith("deploy/prometheus/prometheus.yml")
    assert targets[("grafana", "/etc/grafana/provisioning")].endswith("deploy/grafana/provisioning")


def test_nginx_balances_every_replica_and_upgrades_websockets(replicas, services):
    conf = re.sub(r"#[^\n]*", "", NGINX_CONFIG.read_text(encoding="utf-8"))  # comments
    upstream = re.search(r"upstream\s+(\S+)\s*\{(.*?)\}", conf, re.S)
    assert upstream, "nginx.conf has no upstream block"
    servers = set(re.findall(r"^\s*server\s+([\w.-]+):8000\b", upstream.group(2), re.M))
    assert servers == set(replicas), servers
    assert re.search(rf"proxy_pass\s+http://{re.escape(upstream.group(1))}\s*;", conf)
    assert re.search(r"listen\s+8000\s*;", conf)
    stream = re.search(r"location\s+~\s+(\S*stream\S*)\s*\{(.*?)\}", conf, re.S)
    assert stream, "no location for /v1/sessions/{id}/stream"
    assert re.fullmatch(stream.group(1).strip('"'), "/v1/sessions/abc-123/stream")
    assert re.fullmatch(stream.group(1).strip('"'), "/v1/sessions/stream")  # a new session (the keyboard page)
    assert not re.fullmatch(stream.group(1).strip('"'), "/v1/sessions/abc-123/text")
    # nginx inherits proxy_set_header from the server level only into locations setting none.
    block = stream.group(2)
    if "proxy_set_header" not in block:
        block = re.sub(r"location\s[^{]*\{[^}]*\}", "", conf)
    assert re.search(r"proxy_http_version\s+1\.1", conf)
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade", block)
    assert re.search(r"proxy_set_header\s+Connection\s+\S*upgrade", block, re.I)


def test_prometheus_scrapes_every_replica_every_second(prometheus_config, replicas):
    global_interval = prometheus_config.get("global", {}).get("scrape_interval", "1m")
    scraped: dict[str, float] = {}
    for job in prometheus_config["scrape_configs"]:
        interval = duration_seconds(job.get("scrape_interval", global_interval))
        assert duration_seconds(job.get("scrape_timeout", "1s")) <= interval
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                scraped[target] = interval
    for name in replicas:
        assert f"{name}:8000" in scraped, f"Prometheus does not scrape {name}"
        assert scraped[f"{name}:8000"] <= 1.0, f"{name} is scraped every {scraped[f'{name}:8000']}s"


def test_grafana_provisioning(services):
    env = _environment(services["grafana"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"].lower() == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {dst: src for src, dst in _bind_mounts(services["grafana"])}
    dashboards_src = mounts.get("/var/lib/grafana/dashboards") or next(
        src for dst, src in mounts.items() if src.rstrip("/").endswith("deploy/grafana/dashboards")
    )
    dashboards_dst = next(dst for dst, src in mounts.items() if src == dashboards_src)

    providers = [
        p
        for f in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers
    assert any(
        p["type"] == "file" and p["options"]["path"].rstrip("/") == dashboards_dst.rstrip("/") for p in providers
    ), "no dashboard provider reads the mounted dashboards directory"
    assert DASHBOARD.is_file() and (ROOT / dashboards_src / DASHBOARD.name).is_file()

    datasources = [
        d
        for f in sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml"))
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prometheus) == 1
    assert prometheus[0]["url"].rstrip("/") == "http://prometheus:9090"
    assert duration_seconds(prometheus[0]["jsonData"]["timeInterval"]) <= 1.0

    uids = set()

    def collect(node):
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and ds.get("type") == "prometheus":
                uids.add(ds.get("uid"))
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(json.loads(DASHBOARD.read_text()))
    assert uids == {prometheus[0]["uid"]}, f"dashboard datasource uids {uids} vs provisioned {prometheus[0]['uid']}"


# ---------------------------------------------------------------- the dashboard


def test_metric_name_extraction():
    assert metric_names('sum by (route, status) (rate(nextword_requests_total{status=~"5.."}[1m]))') == {
        "nextword_requests_total"
    }
    assert metric_names(
        "histogram_quantile(0.95, sum by (le) (rate(a_bucket[$__rate_interval]))) / ignoring(x) group_left() b"
    ) == {"a_bucket", "b"}
    assert metric_names('label_replace(rate(x[5m]), "class", "$1", "status", "(.)..") or vector(0)') == {"x"}
    assert metric_names("up == 1e3 and on(instance) c offset 5m") == {"up", "c"}


def test_dashboard_uses_only_documented_metrics():
    documented = documented_metrics()
    assert "nextword_requests_total" in documented and documented["nextword_batch_size"] == "histogram"
    allowed = allowed_series(documented)
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: {expr} selects no metric"
        unknown = names - allowed
        assert not unknown, f"panel {title!r} uses {sorted(unknown)}, not listed in docs/metrics.md"


def test_dashboard_covers_the_required_views():
    used = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    for name in (
        "nextword_requests_total",
        "nextword_request_duration_seconds_bucket",
        "nextword_queue_wait_seconds_bucket",
        "nextword_inference_duration_seconds_bucket",
        "nextword_batch_size_bucket",
        "nextword_sessions_active",
        "nextword_sessions_evicted_total",
        "nextword_sessions_expired_total",
        "nextword_tokens_total",
        "nextword_model_version_info",
        "nextword_model_loads_total",
        "nextword_generated_words_total",
        "nextword_generation_time_to_first_word_seconds_bucket",
    ):
        assert name in used, f"no panel shows {name}"
    exprs = [expr for _, expr in dashboard_exprs()]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({quantile}," in e and "nextword_request_duration_seconds_bucket" in e for e in exprs
        )


def test_dashboard_expressions_do_not_filter_away_zero_rates():
    """A comparison filter (``rate(x[w]) > 0``) returns nothing while the rate is 0; panels must
    show 0 rather than "no data"."""
    for title, expr in dashboard_exprs():
        assert not re.search(r"\)\s*(>|<|>=|<=|==|!=)\s*[\d.]", expr), f"{title}: {expr}"
        for window in re.findall(r"\[([^\]]+)\]", expr):
            if window not in ("$__rate_interval", "$__interval", "$__range"):
                assert duration_seconds(window) <= 30, f"{title}: window {window} is too long to show fresh data"


def test_ci_script_and_makefile():
    ci = ROOT / ".ci" / "run"
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert ci.stat().st_mode & 0o111, ".ci/run must be executable"
    assert "redis-server" in text and "prometheus" in text
    assert "chromium" in text and "chromium-driver" in text  # the keyboard page's browser test
    assert shlex.split(text.strip().splitlines()[-1]) == ["make", "test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("venv", "serve", "test", "test-quick", "lint", "bench"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"Makefile has no {target} target"
