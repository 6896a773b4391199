"""The largest requests the documented limits allow, against a real server on the shipped model
(``models/brown-lstm``: its 17,977-word vocabulary is what makes the score graph's
[time, vocabulary] tensors big). Each must answer, within the deadline, with the process's peak
memory bounded and returned afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, Server, _start_server

MODELS = ROOT / "models"
PEAK_LIMIT_MB = 500


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


class Memory:
    """RSS of one process, with its peak (``VmHWM``) reset before each measured request."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rss_mb(self) -> float:
        return _status_kb(self.pid, "VmRSS") / 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # "5": reset the peak RSS

    def peak_mb(self) -> float:
        return _status_kb(self.pid, "VmHWM") / 1024


@pytest.fixture(scope="module")
def brown(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not any((MODELS / "brown-lstm").glob("*/model.json")):
        pytest.skip("the shipped model is not in models/")
    server = _start_server(MODELS, tmp_path_factory.mktemp("limits-logs"))
    try:
        yield server
    finally:
        server.stop()


def _settings() -> object:
    from service.config import Settings

    return Settings()


def test_largest_score_bounds_and_returns_memory(brown: Server) -> None:
    settings = _settings()
    mem = Memory(brown.proc.pid)
    with httpx.Client(base_url=brown.url, timeout=60) as client:
        assert client.post("/v1/score", json={"text": "the cat sat on the mat"}).status_code == 200  # warm
        idle = mem.rss_mb()
        mem.reset_peak()
        words = settings.max_score_words
        r = client.post("/v1/score", json={"text": "the " * words})
        assert r.status_code == 200, r.text
        assert len(r.json()["words"]) == words
        peak = mem.peak_mb()
        assert peak - idle < PEAK_LIMIT_MB, f"score of {words} words peaked {peak - idle:.0f} MB above idle"
        # OpenAI echo with logprobs scores the prompt the same way.
        mem.reset_peak()
        r = client.post("/openai/v1/completions", json={
            "model": "brown-lstm", "prompt": "the " * words, "max_tokens": 1, "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        assert mem.peak_mb() - idle < PEAK_LIMIT_MB
        assert mem.rss_mb() - idle < 150, "the memory of the request was not returned"
        # One word more than the limit is refused up front, in each front end's shape.
        over = "the " * (words + 1)
        r = client.post("/v1/score", json={"text": over})
        assert r.status_code == 413 and r.json()["error"]["type"] == "text_too_long"
        r = client.post("/openai/v1/completions", json={
            "model": "brown-lstm", "prompt": over, "max_tokens": 1, "echo": True, "logprobs": 1})
        assert r.status_code == 413 and "NEXTWORD_MAX_SCORE_WORDS" in r.json()["error"]["message"]


def test_full_batch_of_long_texts_is_served(brown: Server) -> None:
    """NEXTWORD_MAX_BATCH_ITEMS items of 4,000 words: the context budget bounds each item's cost, so
    the whole request fits the deadline (it took 64 x 4,001 recurrent steps and answered 504)."""
    settings = _settings()
    item = "a " * 4000
    mem = Memory(brown.proc.pid)
    with httpx.Client(base_url=brown.url, timeout=60) as client:
        idle = mem.rss_mb()
        mem.reset_peak()
        r = client.post("/v1/predict/batch", json={"items": [{"text": item, "k": 3}] * settings.max_batch_items})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == settings.max_batch_items
        assert all(x["truncated"] and x["context_words"] == settings.context_words for x in results)
        assert mem.peak_mb() - idle < PEAK_LIMIT_MB
        # onnxruntime's arena kept the batch's ~370 MB for good until big runs shrank it afterwards.
        assert mem.rss_mb() - idle < 150, f"the batch's memory was not returned: {mem.rss_mb() - idle:.0f} MB"


def test_largest_generation_session_and_kserve_batch_are_served(brown: Server) -> None:
    """The other requests as large as the limits allow: a generation of NEXTWORD_MAX_GENERATION_WORDS
    words by the widest beam with every alternative reported, from the longest prompt; a session
    created from the longest text; a KServe batch of NEXTWORD_MAX_BATCH_ITEMS texts filling the
    body limit. Each is answered, with the peak memory bounded."""
    from service.engine.generate import MAX_BEAM_WIDTH, MAX_COMPLETIONS, MAX_TOP_LOGPROBS

    settings = _settings()
    mem = Memory(brown.proc.pid)
    longest = ("the cat sat on the mat . " * settings.max_text_chars)[: settings.max_text_chars]
    with httpx.Client(base_url=brown.url, timeout=60) as client:
        idle = mem.rss_mb()
        mem.reset_peak()
        r = client.post("/v1/generate", json={
            "prompt": longest, "max_words": settings.max_generation_words, "strategy": "beam",
            "beam_width": MAX_BEAM_WIDTH, "n": min(MAX_COMPLETIONS, MAX_BEAM_WIDTH), "logprobs": MAX_TOP_LOGPROBS,
            "length_penalty": 0})  # no reward for stopping early: the beams run the whole length
        assert r.status_code == 200, r.text
        assert len(r.json()["completions"]) == min(MAX_COMPLETIONS, MAX_BEAM_WIDTH)
        assert mem.peak_mb() - idle < PEAK_LIMIT_MB

        mem.reset_peak()
        r = client.post("/v1/sessions", json={"text": longest})
        assert r.status_code == 201, r.text
        assert mem.peak_mb() - idle < PEAK_LIMIT_MB
        client.delete(f"/v1/sessions/{r.json()['session_id']}")

        per_text = (settings.max_body_bytes - 4096) // settings.max_batch_items  # the JSON around them
        texts = [("of the " * per_text)[:per_text] for _ in range(settings.max_batch_items)]
        mem.reset_peak()
        r = client.post("/v2/models/brown-lstm/infer", json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [settings.max_batch_items, 5]
        assert mem.peak_mb() - idle < PEAK_LIMIT_MB
        assert mem.rss_mb() - idle < 150, "the memory of the requests was not returned"
