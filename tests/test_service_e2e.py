"""The service as deployed: a real uvicorn process on a free local port, spoken to over HTTP.

Predictions against onnxruntime run directly, batching equivalence under concurrency, queue-full
503s, hot reload during traffic with zero failed requests, corrupt versions rejected while the
previous one serves, metrics, bad input, and the ``nextword-serve`` entry point."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from nextword.text import split_text

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "", "the ", "The quick brown fox jumps over the lazy dog. ", "the qu", "she said that th", "It was. He ",
    "a", "apple apple apple apple apple apple apple apple apple apple apple apple ", "Mr. Smith of the U.S",
    "they don't ", "1960s", "the cat sat on the mat and the dog sat on the cat and then they ", "unknownish ",
]


def metric_samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_predictions_match_direct_onnxruntime(live_server: str, reference) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as client:
        for text in TEXTS:
            for model, version in [("tiny", 2), ("tinygru", 1), ("tiny", 1)]:
                r = client.post("/v1/predict", json={"text": text, "k": 5, "model": model, "version": version})
                assert r.status_code == 200, r.text
                body = r.json()
                split = split_text(text)
                expected = reference.top_words(model, version, split.context, 5, split.prefix)
                assert (body["model"], body["version"], body["prefix"]) == (model, version, split.prefix)
                assert [p["word"] for p in body["predictions"]] == [w for w, _ in expected], text
                assert [p["probability"] for p in body["predictions"]] == pytest.approx([p for _, p in expected],
                                                                                         rel=1e-5)
        r = client.post("/v1/score", json={"text": "The quick brown fox.", "model": "tinygru"})
        words = [w["word"] for w in r.json()["words"]]
        expected = reference.score("tinygru", 1, words)
        assert [w["log_prob"] for w in r.json()["words"]] == pytest.approx(expected.tolist(), abs=1e-5)


def test_concurrent_requests_equal_sequential_ones(live_server: str) -> None:
    """Many concurrent requests of different lengths (coalesced into batches) answer exactly what
    the same requests answer one at a time."""
    bodies = [{"text": TEXTS[i % len(TEXTS)] + " the" * (i % 7), "k": 5, "model": ["tiny", "tinygru"][i % 2]}
              for i in range(48)]
    bodies += [{"text": text} for text in TEXTS]

    with httpx.Client(base_url=live_server, timeout=30) as client:
        sequential = [client.post("/v1/predict", json=b).json() for b in bodies]
        before = metric_samples(client.get("/metrics").text)

    async def concurrent() -> list[dict]:
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(base_url=live_server, timeout=30, limits=limits) as client:
            responses = await asyncio.gather(*(client.post("/v1/predict", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses]

    together = asyncio.run(concurrent())
    with httpx.Client(base_url=live_server, timeout=30) as client:
        after = metric_samples(client.get("/metrics").text)
    for seq, con in zip(sequential, together, strict=True):
        assert [p["word"] for p in con["predictions"]] == [p["word"] for p in seq["predictions"]]
        assert [p["probability"] for p in con["predictions"]] == pytest.approx(
            [p["probability"] for p in seq["predictions"]], rel=1e-6, abs=1e-9)
        assert {k: v for k, v in con.items() if k != "predictions"} == {k: v for k, v in seq.items()
                                                                      if k != "predictions"}
    rows = sum(after[f'nextword_batch_size_sum{{model="{m}"}}'] - before[f'nextword_batch_size_sum{{model="{m}"}}']
               for m in ("tiny", "tinygru"))
    calls = sum(after[f'nextword_batch_size_count{{model="{m}"}}']
                - before[f'nextword_batch_size_count{{model="{m}"}}'] for m in ("tiny", "tinygru"))
    assert rows == len(bodies)
    assert calls < rows, "concurrent requests were never coalesced into a batch"


def test_metrics_present_and_increasing(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as client:
        before = metric_samples(client.get("/metrics").text)
        for text in ["the ", "a qu"]:
            client.post("/v1/predict", json={"text": text})
        client.post("/v1/predict/batch", json={"items": [{"text": "the "}, {"text": "of"}]})
        client.post("/v1/predict", json={"text": "a", "model": "absent"})
        r = client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        after = metric_samples(r.text)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('nextword_requests_total{method="POST",route="/v1/predict",status="200"}') == 2
    assert delta('nextword_requests_total{method="POST",route="/v1/predict/batch",status="200"}') == 1
    assert delta('nextword_requests_total{method="POST",route="/v1/predict",status="404"}') == 1
    assert delta('nextword_tokens_total{graph="predict",model="tiny"}') == 2 + 2 + 2 + 1
    assert delta('nextword_queue_wait_seconds_count{model="tiny"}') == 4
    assert delta('nextword_inference_duration_seconds_count{graph="predict",model="tiny",version="2"}') >= 1
    info = "nextword_model_version_info{{cell=\"{}\",device=\"cpu\",model=\"{}\",status=\"{}\",version=\"{}\"}}"
    assert after[info.format("gru", "tinygru", "serving", 1)] == 1
    assert after[info.format("lstm", "tiny", "loaded", 1)] == 1


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b'{"text": "\xc3\x28"}', 400, "invalid_encoding"),
        (b'{"text": "a",}', 400, "invalid_json"),
        (b'{"text": ["a"]}', 422, "validation_error"),
        (b'{"text": "a", "k": 1000}', 422, "validation_error"),
        (json.dumps({"text": "word " * 20001}).encode(), 413, "text_too_long"),
        (b'{"text": "a", "model": "absent"}', 404, "model_not_found"),
        (b'{"text": "a", "model": "tiny", "version": 5}', 404, "version_not_found"),
    ],
)
def test_bad_input_over_http(live_server: str, body: bytes, status: int, kind: str) -> None:
    r = httpx.post(f"{live_server}/v1/predict", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status
    assert r.json()["error"]["type"] == kind


def test_queue_full_is_503_with_retry_after(model_repository: Path, start_server: Callable) -> None:
    """Started through the ``nextword-serve`` entry point, with JSON logs."""
    server = start_server(model_repository, cli=True, env={
        "NEXTWORD_QUEUE_CAPACITY": "2", "NEXTWORD_MAX_QUEUE_DELAY_MS": "400", "NEXTWORD_LOG_FORMAT": "json",
        "NEXTWORD_LOG_LEVEL": "info",
    })

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json={"text": f"the {i} "}) for i in range(10)))

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 2 and statuses.count(503) == 8, statuses
    full = next(r for r in responses if r.status_code == 503)
    assert full.json()["error"]["type"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1
    samples = metric_samples(httpx.get(f"{server.url}/metrics").text)
    assert samples['nextword_requests_total{method="POST",route="/v1/predict",status="503"}'] == 8
    logs = [line for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(json.loads(line).get("logger", "").startswith("service") for line in logs), server.log_tail()


def test_hot_reload_during_traffic_fails_no_request(repository_copy: Path, start_server: Callable,
                                                    export_version: Callable) -> None:
    server = start_server(repository_copy, env={"NEXTWORD_RELOAD_INTERVAL_SECONDS": "0.1"})

    async def scenario() -> tuple[list[int], set[int], set[int]]:
        statuses: list[int] = []
        default_versions: set[int] = set()
        pinned_versions: set[int] = set()
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

            async def traffic(i: int) -> None:
                pinned = i % 3 == 0  # some clients stick to version 1, which never goes away
                while not stop.is_set():
                    body = {"text": f"the cat {'sat ' * (i % 4)}", "k": 3}
                    if pinned:
                        body["version"] = 1
                    r = await client.post("/v1/predict", json=body)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        (pinned_versions if pinned else default_versions).add(r.json()["version"])

            async def wait_for_version(version: int) -> None:
                deadline = time.monotonic() + 20
                while (await client.get("/readyz")).json()["models"]["tiny"] != version:
                    assert time.monotonic() < deadline, f"version {version} never went live"
                    await asyncio.sleep(0.05)

            tasks = [asyncio.create_task(traffic(i)) for i in range(6)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(export_version, repository_copy, "tiny", 3, seed=11)  # found by polling
            await wait_for_version(3)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(export_version, repository_copy, "tiny", 4, seed=12)
            reload = await client.post("/v1/models/reload")  # explicit reload (the poller may win the race)
            assert reload.status_code == 200 and reload.json()["failed"] == []
            await wait_for_version(4)
            await asyncio.to_thread(shutil.rmtree, repository_copy / "tiny" / "2")  # unload under traffic
            deadline = time.monotonic() + 20
            while 2 in {v["version"] for v in (await client.get("/v1/models/tiny")).json()["versions"]}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
        return statuses, default_versions, pinned_versions

    statuses, default_versions, pinned_versions = asyncio.run(scenario())
    assert len(statuses) > 50
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert {2, 3, 4} <= default_versions
    assert pinned_versions == {1}


def test_corrupt_version_is_rejected_while_previous_serves(repository_copy: Path, start_server: Callable) -> None:
    server = start_server(repository_copy)  # no polling: explicit reloads only
    tmp = repository_copy / "tiny" / ".incoming"
    shutil.copytree(repository_copy / "tiny" / "2", tmp)
    card = json.loads((tmp / "model.json").read_text())
    card["version"] = 3
    (tmp / "model.json").write_text(json.dumps(card))
    good_predict = (tmp / "predict.onnx").read_bytes()
    (tmp / "predict.onnx").write_bytes(good_predict[:-8] + b"corrupt!")
    tmp.rename(repository_copy / "tiny" / "3")

    with httpx.Client(base_url=server.url, timeout=30) as client:
        report = client.post("/v1/models/reload").json()
        assert [(f["model"], f["version"]) for f in report["failed"]] == [("tiny", 3)]
        assert "checksum mismatch" in report["failed"][0]["error"]
        assert client.post("/v1/predict", json={"text": "the "}).json()["version"] == 2
        versions = {v["version"]: v for v in client.get("/v1/models/tiny").json()["versions"]}
        assert versions[3]["status"] == "failed" and "predict.onnx" in versions[3]["error"]
        assert versions[2]["status"] == "serving"
        r = client.post("/v1/predict", json={"text": "the ", "version": 3})
        assert r.status_code == 404 and "failed to load" in r.json()["error"]["message"]
        samples = metric_samples(client.get("/metrics").text)
        assert samples['nextword_model_loads_total{model="tiny",result="failure"}'] == 1
        assert samples['nextword_model_version_info{cell="lstm",device="none",model="tiny",status="failed",'
                       'version="3"}'] == 1

        (repository_copy / "tiny" / "3" / "predict.onnx").write_bytes(good_predict)  # fixed: loads
        assert client.post("/v1/models/reload").json()["loaded"] == ["tiny/3"]
        assert client.post("/v1/predict", json={"text": "the "}).json()["version"] == 3


def test_not_ready_until_a_model_arrives(tmp_path: Path, start_server: Callable, export_version: Callable) -> None:
    repository = tmp_path / "empty"
    repository.mkdir()
    server = start_server(repository, ready=False, env={"NEXTWORD_RELOAD_INTERVAL_SECONDS": "0.1"})
    assert httpx.get(f"{server.url}/readyz").status_code == 503
    export_version(repository, "fresh", 1)
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.post(f"{server.url}/v1/predict", json={"text": "the "}).json()["model"] == "fresh"


def test_cli_refuses_unavailable_cuda(model_repository: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = subprocess.run([sys.executable, "-m", "service.cli", "--device", "cuda", "--port", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                 "NEXTWORD_MODEL_REPOSITORY": str(model_repository)})
    assert result.returncode == 2
    assert re.search(r"NEXTWORD_DEVICE=cuda.*onnxruntime-gpu", result.stderr)
