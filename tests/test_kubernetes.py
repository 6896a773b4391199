"""The Kubernetes manifests (``deploy/kubernetes/``): each object validates against the
Kubernetes API schemas (``kubernetes-validate``, offline, strict: unknown fields fail), the
kustomization lists exactly the files there, and what the manifests name exists in the service:
every ``NEXTWORD_*`` variable is a setting with a valid value, every probe and the scrape path is
a route, ports and selectors line up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"  # the oldest minor release still maintained upstream when written


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict[str, Any]:
    return load(MANIFESTS / "kustomization.yaml")[0]


def objects() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in load(MANIFESTS / name)]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    docs = load(MANIFESTS / name)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def service_env() -> dict[str, str]:
    """The NEXTWORD_* environment of the service container: ConfigMap + explicit env."""
    container = service_container()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "")
    return env


def service_container() -> dict[str, Any]:
    containers = one("Deployment", "nextword")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "nextword")


def test_every_setting_named_exists_and_parses() -> None:
    from service.config import Settings

    env = service_env()
    names = [n for n in env if n.startswith("NEXTWORD_")]
    assert names
    fields = {f"NEXTWORD_{f.upper()}" for f in Settings.model_fields}
    assert [n for n in names if n not in fields] == []
    # The values themselves pass the settings' validation (types, bounds, store URL).
    settings = Settings(**{n.removeprefix("NEXTWORD_").lower(): v for n, v in env.items()})
    assert settings.port == port_of(service_container(), "http")


def port_of(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_probes_and_scrape_path_are_routes_of_the_app(tmp_path: Path) -> None:
    """Each path answers GET on the app (not 404/405). No lifespan runs, so no model is loaded:
    /readyz then answers 503, which is its answer for that state, not a missing route."""
    from starlette.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    client = TestClient(create_app(Settings(model_repository=tmp_path, reload_interval_seconds=0)))
    container = service_container()
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    annotations = one("Deployment", "nextword")["spec"]["template"]["metadata"]["annotations"]
    for path in [*(p["path"] for p in probes.values()), annotations["prometheus.io/path"]]:
        assert client.get(path).status_code not in (404, 405), path
    assert client.get("/readyz").json()["ready"] is False
    for probe in probes.values():
        assert probe["port"] in ("http", port_of(container, "http"))
    assert int(annotations["prometheus.io/port"]) == port_of(container, "http")


def test_objects_refer_to_each_other() -> None:
    deployment = one("Deployment", "nextword")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one("Service", "nextword")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in service_container()["ports"]}
    assert one("PodDisruptionBudget", "nextword")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one("HorizontalPodAutoscaler", "nextword")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nextword"}
    # The PodDisruptionBudget can always let one pod go without taking the service down.
    assert hpa["spec"]["minReplicas"] >= 2 and deployment["spec"]["replicas"] >= 2
    # The HPA's utilisation target is relative to the CPU request, so there must be one.
    assert "cpu" in service_container()["resources"]["requests"]

    # The init container fills the volume the service reads its model repository from.
    pod = deployment["spec"]["template"]["spec"]
    repository = service_env()["NEXTWORD_MODEL_REPOSITORY"]
    mounts = {m["mountPath"]: m["name"] for m in service_container()["volumeMounts"]}
    init = next(c for c in pod["initContainers"] if c["name"] == "models")
    assert repository in mounts and {m["name"] for m in init["volumeMounts"]} == {mounts[repository]}
    assert init["command"][-1].rstrip("/") == repository
    assert mounts[repository] in {v["name"] for v in pod["volumes"]}

    # The session store URL names the Redis Service, which selects the StatefulSet's pods.
    redis_service, statefulset = one("Service", "redis"), one("StatefulSet", "redis")
    assert service_env()["NEXTWORD_SESSION_STORE"].startswith(f"redis://{redis_service['metadata']['name']}:")
    assert statefulset["spec"]["serviceName"] == redis_service["metadata"]["name"]
    assert redis_service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()

    # The kustomization's image names are the ones the pods use.
    images = {c["image"] for c in [*pod["containers"], *pod["initContainers"]]}
    assert {i["name"] for i in kustomization()["images"]} == images
