"""The model repository: loading, checksums, self-check, versions, hot reload and unloading."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nextword import artifact as A
from service import metrics
from service.engine import ModelRepository, Predictor, WorkItem
from service.engine.errors import ModelLoadError, ModelNotFoundError, NoModelLoadedError, VersionNotFoundError
from service.engine.repository import FAILED, LOADED, SERVING, self_check


def counter(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def place_version(source: Path, target: Path, mutate: Any = None) -> Path:
    """Copy a version directory into place the way export does: a hidden temporary, then rename."""
    tmp = target.parent / f".tmp-{target.name}"
    shutil.copytree(source, tmp)
    if mutate is not None:
        mutate(tmp)
    card = json.loads((tmp / "model.json").read_text())
    card["version"] = int(target.name)
    (tmp / "model.json").write_text(json.dumps(card))
    tmp.rename(target)
    return target


def corrupt_predict(directory: Path) -> None:
    with (directory / "predict.onnx").open("ab") as fh:
        fh.write(b"\0")


@pytest.fixture
def repo(repository_copy: Path, service_settings) -> ModelRepository:
    repository = ModelRepository(service_settings(repository_copy))
    repository.scan()
    yield repository
    repository.close()


def test_loads_every_version_and_serves_the_newest(repo: ModelRepository) -> None:
    assert repo.ready
    assert repo.resolve().name == "tiny"  # first name alphabetically
    assert repo.resolve("tiny").version == 2
    assert repo.resolve("tiny", 1).version == 1
    assert repo.resolve("tinygru").card.cell == "gru"
    status = repo.status()
    assert [(v.version, v.status) for v in status["tiny"]] == [(2, SERVING), (1, LOADED)]
    assert status["tiny"][0].metrics == {"test": {"perplexity": 42.0, "top1": 0.1}}
    assert status["tiny"][0].device == "cpu"
    with pytest.raises(ModelNotFoundError):
        repo.resolve("nope")
    with pytest.raises(VersionNotFoundError):
        repo.resolve("tiny", 9)
    info = metrics.MODEL_VERSION_INFO.labels("tiny", "2", "lstm", "cpu", SERVING)._value.get()
    assert info == 1


def test_default_model_setting(repository_copy: Path, service_settings) -> None:
    repository = ModelRepository(service_settings(repository_copy, default_model="tinygru"))
    try:
        repository.scan()
        assert repository.resolve().name == "tinygru"
    finally:
        repository.close()


def test_empty_repository_is_not_ready(tmp_path: Path, service_settings) -> None:
    repository = ModelRepository(service_settings(tmp_path / "missing"))
    try:
        report = repository.scan()
        assert not repository.ready and report.loaded == []
        with pytest.raises(NoModelLoadedError):
            repository.resolve()
    finally:
        repository.close()


def test_corrupt_version_is_rejected_and_previous_keeps_serving(repo: ModelRepository) -> None:
    failures = counter("nextword_model_loads_total", model="tiny", result="failure")
    place_version(repo.root / "tiny" / "2", repo.root / "tiny" / "3", corrupt_predict)
    report = repo.scan()
    assert [(n, v) for n, v, _ in report.failed] == [("tiny", 3)]
    assert "checksum mismatch" in report.failed[0][2]
    assert repo.resolve("tiny").version == 2
    status = {v.version: v for v in repo.status("tiny")["tiny"]}
    assert status[3].status == FAILED and "checksum" in status[3].error
    assert status[2].status == SERVING
    with pytest.raises(VersionNotFoundError, match="failed to load"):
        repo.resolve("tiny", 3)
    assert counter("nextword_model_loads_total", model="tiny", result="failure") == failures + 1
    assert counter("nextword_model_version_info", model="tiny", version="3", cell="lstm", device="none",
                   status=FAILED) == 1

    # Unchanged files are not retried by polling, only by an explicit (forced) reload.
    repo.scan()
    assert counter("nextword_model_loads_total", model="tiny", result="failure") == failures + 1
    repo.scan(force=True)
    assert counter("nextword_model_loads_total", model="tiny", result="failure") == failures + 2

    # Fixing the file (its fingerprint changes) lets the next poll load it.
    shutil.copy2(repo.root / "tiny" / "2" / "predict.onnx", repo.root / "tiny" / "3" / "predict.onnx")
    report = repo.scan()
    assert report.loaded == [("tiny", 3)]
    assert repo.resolve("tiny").version == 3
    assert all(v.error is None for v in repo.status("tiny")["tiny"])
    assert counter("nextword_model_version_info", model="tiny", version="3", cell="lstm", device="none",
                   status=FAILED) == 0  # stale series removed


@pytest.mark.parametrize(
    ("problem", "error"),
    [("name", "directory is tiny/4"), ("vocab", "has 67 words"), ("card", "not valid JSON"),
     ("graph", "the card implies"), ("missing", "vocab.txt is missing")],
)
def test_broken_versions_are_reported(repo: ModelRepository, problem: str, error: str) -> None:
    def mutate(directory: Path) -> None:
        card = json.loads((directory / "model.json").read_text())
        if problem == "name":
            card["name"] = "other"
        elif problem == "vocab":
            card["vocab_size"] += 1
        elif problem == "graph":  # checksums still match: only the graph signature check can tell
            card["graphs"]["predict"] = "score.onnx"
        elif problem == "missing":
            (directory / "vocab.txt").unlink()
        (directory / "model.json").write_text("{not json" if problem == "card" else json.dumps(card))

    target = repo.root / "tiny" / "4"
    shutil.copytree(repo.root / "tiny" / "2", target)
    card = json.loads((target / "model.json").read_text())
    card["version"] = 4
    (target / "model.json").write_text(json.dumps(card))
    mutate(target)
    report = repo.scan()
    assert [(n, v) for n, v, _ in report.failed] == [("tiny", 4)]
    assert error in report.failed[0][2]
    assert repo.resolve("tiny").version == 2


def test_self_check_rejects_nonsense_outputs(repo: ModelRepository) -> None:
    lv = repo.resolve("tiny")

    class Broken:
        card = lv.runtime.card

        def zero_state(self, batch: int) -> dict[str, np.ndarray]:
            return lv.runtime.zero_state(batch)

        def run(self, graph: str, feeds: dict, outputs: list[str]) -> tuple[list[np.ndarray], float]:
            result, elapsed = lv.runtime.run(graph, feeds, outputs)
            if graph == "predict":
                result = [result[0] + 1.0]  # no longer a distribution
            return result, elapsed

    with pytest.raises(ModelLoadError, match="do not sum to 1"):
        self_check(Broken(), lv.vocab)  # type: ignore[arg-type]
    self_check(lv.runtime, lv.vocab)


def test_new_version_swaps_in_and_removed_version_unloads(repo: ModelRepository, export_version) -> None:
    old = repo.resolve("tiny", 1)
    export_version(repo.root, "tiny", 3, seed=7)
    report = repo.scan()
    assert report.loaded == [("tiny", 3)]
    assert repo.resolve("tiny").version == 3
    assert repo.resolve("tiny", 2).version == 2  # older versions stay available on request
    shutil.rmtree(repo.root / "tiny" / "1")
    report = repo.scan()
    assert report.unloaded == [("tiny", 1)]
    with pytest.raises(VersionNotFoundError):
        repo.resolve("tiny", 1)
    deadline = time.monotonic() + 5
    while not old.batcher.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old.batcher.closed
    shutil.rmtree(repo.root / "tinygru")
    repo.scan()
    assert "tinygru" not in repo.status()


def test_unloading_drains_in_flight_work(repo: ModelRepository) -> None:
    lv = repo.resolve("tiny", 1)
    lv.batcher.max_queue_delay = 0.2  # hold the items in the queue while the version goes away
    futures = lv.batcher.submit_many([WorkItem(np.array([1, 2, 3])) for _ in range(8)])
    shutil.rmtree(repo.root / "tiny" / "1")
    repo.scan()
    assert all(f.result(timeout=5).log_probs is not None for f in futures)


def test_predictor_re_resolves_after_a_swap(repo: ModelRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that looked up a version just before its batcher closed is answered by the new one."""
    stale = repo.resolve("tiny", 1)
    stale.batcher.close()
    real = repo.resolve
    calls = []

    def resolve(name: str | None = None, version: int | None = None):
        calls.append(version)
        return stale if len(calls) == 1 else real(name, version)

    monkeypatch.setattr(repo, "resolve", resolve)
    prediction = asyncio.run(Predictor(repo, repo.settings).predict("the "))
    assert prediction.version == 2 and len(calls) == 2


def test_watcher_picks_up_new_versions(repo: ModelRepository, export_version) -> None:
    repo.start_watching(0.05)
    export_version(repo.root, "tinygru", 2, cell="gru", seed=8)
    deadline = time.monotonic() + 10
    while repo.resolve("tinygru").version != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert repo.resolve("tinygru").version == 2


def test_model_card_checksums_cover_graphs(repo: ModelRepository) -> None:
    card = A.read_card(repo.root / "tiny" / "2")
    assert {"predict.onnx", "score.onnx", "vocab.txt"} <= set(card.files)


def test_odd_version_directory_names_never_break_a_scan(repo: ModelRepository, caplog) -> None:
    """``"²".isdigit()`` is True but ``int("²")`` raises: such a directory broke every scan (start-up,
    reload, polling). Non-canonical names are skipped with one warning; real versions still load."""
    for odd in ("²", "٣", "007", "1" * 40, "v3", "3.tmp"):
        shutil.copytree(repo.root / "tiny" / "2", repo.root / "tiny" / odd)
    place_version(repo.root / "tiny" / "2", repo.root / "tiny" / "5")
    with caplog.at_level("WARNING", logger="service.engine.repository"):
        report = repo.scan()
        repo.scan()
    assert report.loaded == [("tiny", 5)] and report.failed == []
    assert sorted(v.version for v in repo.status("tiny")["tiny"]) == [1, 2, 5]
    skipped = [r.getMessage() for r in caplog.records if "not a version directory" in r.getMessage()]
    assert len(skipped) == 6  # once each, not on every poll
    assert ModelRepository(repo.settings).scan().failed == []  # a fresh start-up scan too


def test_version_without_model_json_is_listed_as_failed(repo: ModelRepository, caplog) -> None:
    target = repo.root / "tiny" / "6"
    shutil.copytree(repo.root / "tiny" / "2", target)
    (target / "model.json").unlink()
    with caplog.at_level("ERROR", logger="service.engine.repository"):
        report = repo.scan()
    assert report.failed == [("tiny", 6, "model.json does not exist")]
    assert any("tiny version 6 failed to load" in r.getMessage() for r in caplog.records)
    info = {v.version: v for v in repo.status("tiny")["tiny"]}[6]
    assert info.status == FAILED and info.error == "model.json does not exist"
    assert repo.resolve("tiny").version == 2


def test_load_errors_name_no_absolute_paths(repo: ModelRepository) -> None:
    target = place_version(repo.root / "tiny" / "2", repo.root / "tiny" / "7")
    (target / "predict.onnx").write_bytes(b"not a graph")
    card = json.loads((target / "model.json").read_text())
    card["files"]["predict.onnx"] = A.sha256_file(target / "predict.onnx")
    (target / "model.json").write_text(json.dumps(card))
    report = repo.scan()
    assert [(n, v) for n, v, _ in report.failed] == [("tiny", 7)]
    error = report.failed[0][2]
    assert "onnxruntime cannot load" in error and str(repo.root.resolve()) not in error and str(repo.root) not in error
