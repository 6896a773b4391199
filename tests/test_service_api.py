"""The HTTP API in-process (Starlette TestClient, lifespan included): endpoints, error shapes for
every kind of bad input, metrics, configuration, logging, and the torch-free import."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from nextword.text import split_text
from service.config import Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parents[1]
DOC_METRICS = re.findall(r"^\| `(nextword_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M)


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    settings = Settings(model_repository=model_repository, device="cpu", intra_op_threads=1, reload_interval_seconds=0,
                        max_text_chars=200, max_batch_items=4, context_words=8, max_body_bytes=4096,
                        log_level="warning")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"type", "message", "field"} <= set(body["error"])
    return body["error"]


# --------------------------------------------------------------------------- happy paths


def test_startup_settles_the_garbage_collector(client: TestClient) -> None:
    import gc

    assert gc.get_freeze_count() > 0  # the loaded models are out of the collector's generations
    assert gc.get_threshold()[0] == 20_000


def test_predict_next_word(client: TestClient, reference) -> None:
    r = client.post("/v1/predict", json={"text": "The quick brown ", "k": 4})
    assert r.status_code == 200
    body = r.json()
    assert (body["model"], body["version"], body["prefix"], body["truncated"]) == ("tiny", 2, "", False)
    assert body["context_words"] == 3
    expected = reference.top_words("tiny", 2, ["the", "quick", "brown"], 4)
    assert [p["word"] for p in body["predictions"]] == [w for w, _ in expected]
    for p, (_, prob) in zip(body["predictions"], expected, strict=True):
        assert p["probability"] == pytest.approx(prob, rel=1e-5)


def test_predict_completes_a_prefix(client: TestClient, reference) -> None:
    body = client.post("/v1/predict", json={"text": "I saw the qu", "k": 10, "model": "tinygru"}).json()
    assert body["prefix"] == "qu" and body["model"] == "tinygru"
    words = [p["word"] for p in body["predictions"]]
    assert sorted(words) == ["queen", "quick", "quiet", "quite"]
    assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-6)
    assert words == [w for w, _ in reference.top_words("tinygru", 1, ["i", "saw", "the"], 10, "qu")]


def test_predict_specific_version_and_empty_text(client: TestClient, reference) -> None:
    body = client.post("/v1/predict", json={"text": "", "version": 1}).json()
    assert (body["version"], body["context_words"]) == (1, 0)
    assert [p["word"] for p in body["predictions"]] == [w for w, _ in reference.top_words("tiny", 1, [], 5)]


def test_long_context_is_truncated_not_rejected(client: TestClient, reference) -> None:
    text = "the cat sat on the mat and the dog sat on the cat . "  # 14 words, budget 8
    body = client.post("/v1/predict", json={"text": text}).json()
    assert body["truncated"] is True and body["context_words"] == 8
    context = split_text(text).context[-8:]
    assert [p["word"] for p in body["predictions"]] == [w for w, _ in reference.top_words("tiny", 2, context, 5)]


def test_batch_predict(client: TestClient) -> None:
    items = [{"text": "the "}, {"text": "the th", "k": 2}, {"text": "a", "model": "tinygru"}]
    r = client.post("/v1/predict/batch", json={"items": items})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["prefix"] for x in results] == ["", "th", "a"]
    assert [x["model"] for x in results] == ["tiny", "tiny", "tinygru"]
    singles = [client.post("/v1/predict", json=item).json() for item in items]
    assert results == singles


def test_score(client: TestClient, reference) -> None:
    r = client.post("/v1/score", json={"text": "The cat sat on the mat."})
    assert r.status_code == 200
    body = r.json()
    words = [w["word"] for w in body["words"]]
    assert words == ["the", "cat", "sat", "on", "the", "mat", ".", "<eos>"]
    expected = reference.score("tiny", 2, words)
    assert [w["log_prob"] for w in body["words"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert body["num_words"] == 8
    assert body["perplexity"] == pytest.approx(float(__import__("math").exp(-sum(expected) / 8)), rel=1e-5)


def test_models_endpoints(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["default_model"] == "tiny" and body["device"] == "cpu"
    assert body["providers"] == ["CPUExecutionProvider"]
    models = {m["name"]: m for m in body["models"]}
    assert models["tiny"]["serving_version"] == 2
    assert [(v["version"], v["status"]) for v in models["tiny"]["versions"]] == [(2, "serving"), (1, "loaded")]
    version = models["tinygru"]["versions"][0]
    assert (version["cell"], version["vocab_size"], version["device"]) == ("gru", 67, "cpu")
    assert version["metrics"]["test"]["perplexity"] == 42.0
    assert client.get("/v1/models/tinygru").json()["name"] == "tinygru"
    assert error_of(client.get("/v1/models/absent"))["type"] == "model_not_found"


def test_health_ready_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "models": {"tiny": 2, "tinygru": 1}, "draining": False}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/v1/score", "/v1/models", "/v1/models/{name}",
            "/v1/models/reload", "/healthz", "/readyz"} <= set(paths)


def test_not_ready_without_models(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, device="cpu", reload_interval_seconds=0, log_level="warning")
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = c.post("/v1/predict", json={"text": "a"})
        assert r.status_code == 503 and error_of(r)["type"] == "no_model_loaded" and "Retry-After" in r.headers


# --------------------------------------------------------------------------- bad input

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "kind", "field"),
    [
        ("/v1/predict", b'{"text": ', JSON, 400, "invalid_json", None),
        ("/v1/predict", b'{"text": "caf\xe9"}', JSON, 400, "invalid_encoding", None),
        ("/v1/predict", b'{"text": "ok"}', {}, 422, "validation_error", None),  # no JSON content type
        ("/v1/predict", b"", JSON, 422, "validation_error", None),
        ("/v1/predict", b"[1, 2]", JSON, 422, "validation_error", None),
        ("/v1/predict", b'{"text": 3}', JSON, 422, "validation_error", "text"),
        ("/v1/predict", b'{"k": 3}', JSON, 422, "validation_error", "text"),
        ("/v1/predict", b'{"text": "a", "k": 0}', JSON, 422, "validation_error", "k"),
        ("/v1/predict", b'{"text": "a", "k": 101}', JSON, 422, "validation_error", "k"),
        ("/v1/predict", b'{"text": "a", "k": "many"}', JSON, 422, "validation_error", "k"),
        ("/v1/predict", b'{"text": "a", "version": 0}', JSON, 422, "validation_error", "version"),
        ("/v1/predict", b'{"text": "a", "tetx": "b"}', JSON, 422, "validation_error", "tetx"),
        ("/v1/predict", json.dumps({"text": "a" * 201}).encode(), JSON, 413, "text_too_long", "text"),
        ("/v1/predict", json.dumps({"text": "a" * 5000}).encode(), JSON, 413, "payload_too_large", None),
        ("/v1/predict", b'{"text": "a", "model": "nope"}', JSON, 404, "model_not_found", "model"),
        ("/v1/predict", b'{"text": "a", "version": 99}', JSON, 404, "version_not_found", "version"),
        ("/v1/predict/batch", b'{"items": []}', JSON, 422, "validation_error", "items"),
        ("/v1/predict/batch", json.dumps({"items": [{"text": "a"}] * 5}).encode(), JSON, 422, "invalid_input",
         "items"),
        ("/v1/predict/batch", b'{"items": [{"text": "a"}, {"text": 1}]}', JSON, 422, "validation_error",
         "items.1.text"),
        ("/v1/predict/batch", json.dumps({"items": [{"text": "a"}, {"text": "b" * 300}]}).encode(), JSON, 413,
         "text_too_long", "items.1.text"),
        ("/v1/predict/batch", json.dumps({"items": [{"text": "b" * 300}]}).encode(), JSON, 413, "text_too_long",
         "items.0.text"),
        ("/v1/predict", b'{"text": "a\\ud800"}', JSON, 422, "invalid_input", "text"),
        ("/v1/score", b'{"text": "\\udfff b"}', JSON, 422, "invalid_input", "text"),
        ("/v1/score", b'{"text": "   "}', JSON, 422, "invalid_input", "text"),
        ("/v1/score", json.dumps({"text": "a " * 150}).encode(), JSON, 413, "text_too_long", "text"),
        ("/v1/score", b'{"text": "a", "model": "tiny", "version": 7}', JSON, 404, "version_not_found", "version"),
    ],
)
def test_bad_input(client: TestClient, path: str, body: bytes, headers: dict, status: int, kind: str,
                   field: str | None) -> None:
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert (error["type"], error["field"]) == (kind, field), error
    assert error["message"]


def test_deadline_exceeded_is_504(model_repository: Path) -> None:
    settings = Settings(model_repository=model_repository, device="cpu", reload_interval_seconds=0,
                        max_queue_delay_ms=500, request_timeout_seconds=0.05, log_level="warning")
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/predict", json={"text": "the "})
        assert r.status_code == 504 and error_of(r)["type"] == "deadline_exceeded"


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60), k=st.integers(min_value=-2, max_value=120))
def test_arbitrary_text_never_gives_a_server_error(client: TestClient, text: str, k: int) -> None:
    r = client.post("/v1/predict", json={"text": text, "k": k})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        body = r.json()
        assert all(p["word"].startswith(body["prefix"]) or p["correction"] for p in body["predictions"])
        assert len(body["predictions"]) <= k
    r = client.post("/v1/score", json={"text": text})
    assert r.status_code in (200, 422), r.text


def test_unknown_routes_and_methods(client: TestClient) -> None:
    assert error_of(client.get("/v9/nothing"))["type"] == "not_found"  # (/v2 is KServe: its own error shape)
    r = client.get("/v1/predict")
    assert r.status_code == 405 and error_of(r)["type"] == "method_not_allowed"


def test_messages_name_the_problem(client: TestClient) -> None:
    message = error_of(client.post("/v1/predict", json={"text": "a", "k": 0}))["message"]
    assert "k" in message and "greater than or equal to 1" in message
    assert "'nope'" in error_of(client.post("/v1/predict", json={"text": "a", "model": "nope"}))["message"]
    assert "200" in error_of(client.post("/v1/predict", json={"text": "a" * 201}))["message"]
    assert "UTF-8" in error_of(client.post("/v1/predict", content=b'{"text": "\xff"}', headers=JSON))["message"]


# --------------------------------------------------------------------------- metrics


def scrape(client: TestClient) -> dict[str, float]:
    text = client.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_every_documented_metric_is_exported(client: TestClient) -> None:
    text = client.get("/metrics").text
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    # prometheus_client declares counters without their _total suffix.
    declared |= {f"{name}_total" for name in declared}
    assert len(DOC_METRICS) >= 19
    assert set(DOC_METRICS) <= declared, sorted(set(DOC_METRICS) - declared)


def test_metrics_increase_with_traffic(client: TestClient) -> None:
    before = scrape(client)
    for text in ["the ", "the cat ", "a qu"]:
        assert client.post("/v1/predict", json={"text": text}).status_code == 200
    client.post("/v1/score", json={"text": "the cat"})
    client.post("/v1/predict", json={"text": 1})
    after = scrape(client)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('nextword_requests_total{method="POST",route="/v1/predict",status="200"}') == 3
    assert delta('nextword_requests_total{method="POST",route="/v1/predict",status="422"}') == 1
    assert delta('nextword_request_duration_seconds_count{method="POST",route="/v1/predict"}') == 4
    # <eos> + context words: "the " -> 2, "the cat " -> 3, "a qu" -> 2 (the prefix is not fed)
    assert delta('nextword_tokens_total{graph="predict",model="tiny"}') == 2 + 3 + 2
    assert delta('nextword_tokens_total{graph="score",model="tiny"}') == 2
    assert delta('nextword_inference_duration_seconds_count{graph="predict",model="tiny",version="2"}') >= 1
    assert delta('nextword_queue_wait_seconds_count{model="tiny"}') == 4
    assert delta('nextword_batch_size_count{model="tiny"}') >= 1
    assert after['nextword_queue_depth{model="tiny"}'] == 0
    assert after['nextword_model_loads_total{model="tiny",result="success"}'] >= 2
    assert after['nextword_model_version_info{cell="lstm",device="cpu",model="tiny",status="serving",version="2"}'] == 1


def test_metric_labels_hold_no_user_text_or_paths(client: TestClient) -> None:
    client.post("/v1/predict", json={"text": "secretword1 "})
    client.get("/v1/models/secretmodel2")
    client.get("/secretpath3")
    text = client.get("/metrics").text
    assert "secret" not in text
    assert 'route="/v1/models/{name}"' in text and 'route="unmatched"' in text


# --------------------------------------------------------------------------- configuration, logging, imports


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"NEXTWORD_MODEL_REPOSITORY": "/srv/models", "NEXTWORD_DEVICE": "cuda", "NEXTWORD_MAX_BATCH_SIZE": "8",
           "NEXTWORD_MAX_QUEUE_DELAY_MS": "5", "NEXTWORD_CONTEXT_WORDS": "12", "NEXTWORD_LOG_FORMAT": "json",
           "NEXTWORD_SESSION_STORE": "redis://cache:6379/0", "NEXTWORD_PORT": "9000"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert (str(s.model_repository), s.device, s.max_batch_size, s.context_words) == ("/srv/models", "cuda", 8, 12)
    assert s.max_queue_delay_seconds == 0.005 and s.log_format == "json" and s.port == 9000
    assert s.session_store.startswith("redis://")
    monkeypatch.delenv("NEXTWORD_MAX_BATCH_SIZE")
    assert Settings().max_batch_size == 64 and Settings().host == "127.0.0.1"
    monkeypatch.setenv("NEXTWORD_DEVICE", "tpu")
    with pytest.raises(ValueError):
        Settings()


def test_cuda_without_gpu_is_a_startup_error(model_repository: Path) -> None:
    import onnxruntime as ort

    from service.engine.errors import DeviceUnavailableError
    from service.engine.runtime import choose_device

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceUnavailableError, match="onnxruntime-gpu"):
        choose_device("cuda")
    assert "running on CPU" in choose_device("auto").note
    app = create_app(Settings(model_repository=model_repository, device="cuda", log_level="warning"))
    with pytest.raises(DeviceUnavailableError), TestClient(app):
        pass
    with TestClient(create_app(Settings(model_repository=model_repository, device="auto",
                                        reload_interval_seconds=0, log_level="warning"))) as c:
        body = c.get("/v1/models").json()
        assert "running on CPU" in body["device_note"]
        assert body["models"][0]["versions"][0]["device"] == "cpu"


def test_json_log_format() -> None:
    from service.logging import JsonFormatter

    record = logging.LogRecord("service.test", logging.WARNING, __file__, 1, "loaded %s", ("tiny",), None)
    record.model = "tiny"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "loaded tiny" and line["level"] == "warning" and line["model"] == "tiny"


@pytest.mark.e2e
def test_service_never_imports_torch() -> None:
    code = ("import sys, service.main, service.cli, service.engine; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'training')));"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "NEXTWORD_LOG_LEVEL": "warning"})
    assert result.returncode == 0, result.stderr
