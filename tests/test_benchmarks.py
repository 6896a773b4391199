"""The benchmark suite's building blocks (no timing assertions): rebuilding the torch model from an
exported artifact (``training.from_onnx``), the FLOP count, the README marker replacement, the
metrics parsing, and a ``--quick --only runtime`` smoke run on a tiny exported model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from nextword import artifact as A  # noqa: E402
from nextword.text import SPECIAL_TOKENS  # noqa: E402
from nextword.vocab import Vocab  # noqa: E402
from training.export import export_model  # noqa: E402
from training.from_onnx import FromOnnxError, torch_model_from_artifact  # noqa: E402
from training.model import LanguageModel, ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = 50


def _vocab() -> Vocab:
    return Vocab([*SPECIAL_TOKENS, *(f"w{i}" for i in range(V - 2))])


def _export(tmp_path: Path, cell: str = "lstm", *, tied: bool = True, emb: int = 8, hidden: int = 12,
            zoneout: float = 0.0, weights_dtype: str = "float32", quantize: str | None = None,
            name: str = "tiny") -> tuple[LanguageModel, Path]:
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=V, cell=cell, embedding_size=emb, hidden_size=hidden,
                                      num_layers=2, tied=tied, zoneout=zoneout))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    path = export_model(model.eval(), _vocab(), tmp_path / "models", name, 1, weights_dtype=weights_dtype,
                        quantize=quantize)
    return model.eval(), path


def _ort_log_probs(path: Path, tokens: np.ndarray, lengths: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path / A.PREDICT_GRAPH), providers=["CPUExecutionProvider"])
    feeds = {A.TOKENS: tokens, A.LENGTHS: lengths, **{A.state_input(k): v for k, v in state.items()}}
    return sess.run([A.LOG_PROBS], feeds)[0]


@pytest.mark.parametrize(
    ("cell", "tied", "emb", "hidden", "dtype"),
    [
        ("lstm", True, 12, 12, "float16"),  # the default model's shape: tied, E == H, half-size storage
        ("lstm", True, 8, 12, "float32"),  # tied with a projection
        ("lstm", False, 8, 12, "float32"),
        ("gru", False, 8, 12, "float16"),
        ("gru", True, 12, 12, "float32"),
        ("rnn", True, 8, 12, "float32"),
        ("peephole", False, 8, 12, "float32"),
        ("cifg", True, 8, 12, "float16"),
    ],
)
def test_from_onnx_reproduces_the_exported_model(tmp_path: Path, cell, tied, emb, hidden, dtype) -> None:
    original, path = _export(tmp_path, cell, tied=tied, emb=emb, hidden=hidden, weights_dtype=dtype)
    rebuilt = torch_model_from_artifact(path)
    assert not rebuilt.training
    assert rebuilt.cfg.cell == cell and rebuilt.cfg.tied == tied
    if tied:
        assert rebuilt.decoder.weight is rebuilt.embedding.weight

    rng = np.random.default_rng(0)
    lengths = np.array([5, 1, 3], np.int64)
    tokens = rng.integers(0, V, size=(3, 5)).astype(np.int64)
    state = {s: rng.normal(0, 0.5, size=(2, 3, hidden)).astype(np.float32) for s in rebuilt.cfg.state_names}
    expected = _ort_log_probs(path, tokens, lengths, state)
    for row, n in enumerate(lengths):
        row_state = tuple(torch.from_numpy(state[s][:, row : row + 1].copy()) for s in rebuilt.cfg.state_names)
        with torch.inference_mode():
            lp, _ = rebuilt(torch.from_numpy(tokens[row : row + 1, :n]), row_state)
        np.testing.assert_allclose(lp[0, -1].numpy(), expected[row], atol=1e-4, rtol=0)

    # float32 storage gives back the very weights that were exported; float16 their rounding.
    ref = original.state_dict()
    for key, value in rebuilt.state_dict().items():
        want = ref[key].half().float() if dtype == "float16" else ref[key]
        torch.testing.assert_close(value, want, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize(("cell", "zoneout"), [("highway", 0.0), ("lstm", 0.25)])
def test_from_onnx_refuses_unsupported_cells(tmp_path: Path, cell: str, zoneout: float) -> None:
    _, path = _export(tmp_path, cell, zoneout=zoneout)
    with pytest.raises(FromOnnxError, match="supported"):
        torch_model_from_artifact(path)


def test_flop_count_and_readme_markers(tmp_path: Path) -> None:
    from benchmarks.report import replace_between_markers
    from benchmarks.runtime import step_flops

    card = A.ModelCard(name="m", version=1, cell="lstm", num_layers=2, embedding_size=400, hidden_size=400,
                       vocab_size=17977, state_names=["h", "c"], graphs={"predict": "predict.onnx"}, tied=True)
    flops = step_flops(card)
    assert flops["recurrent"] == 2 * (2 * 4 * 400 * (400 + 400))
    assert flops["decoder"] == 2 * 400 * 17977
    readme = "intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\noutro\n"
    out = replace_between_markers(readme, "NEW TABLE\n")
    assert out == "intro\n<!-- bench:start -->\nNEW TABLE\n<!-- bench:end -->\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers("no markers here", "x")


def test_metrics_histogram_parsing() -> None:
    from benchmarks.server import histogram_totals

    text = (
        '# HELP nextword_batch_size Rows per onnxruntime call.\n'
        'nextword_batch_size_bucket{le="1.0",model="tiny"} 3.0\n'
        'nextword_batch_size_count{model="tiny"} 5.0\n'
        'nextword_batch_size_sum{model="tiny"} 42.0\n'
        'nextword_batch_size_count{model="other"} 7.0\n'
        'nextword_batch_size_sum{model="other"} 9.0\n'
    )
    assert histogram_totals(text, "nextword_batch_size", {"model": "tiny"}) == (42.0, 5.0)
    assert histogram_totals(text, "nextword_batch_size") == (51.0, 12.0)


@pytest.mark.slow
def test_quick_runtime_benchmark_smoke(tmp_path: Path) -> None:
    _, path = _export(tmp_path, "lstm", emb=16, hidden=16, quantize="int8")
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "runtime", "--model", str(path),
         "--out", str(out), "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m benchmarks")
    names = {row["name"] for row in data["rows"]}
    assert any("batch 1" in n for n in names) and any("int8" in n for n in names)
    assert all(row["section"] in ("runtime", "roofline") for row in data["rows"])
    assert "| " in proc.stdout  # the table was printed


def test_load_generator_against_a_real_server(live_server: str) -> None:
    """The load generator (its own process, the lean keep-alive client) drives a real uvicorn and
    reads the batch sizes back from /metrics."""
    from benchmarks.http_load import run_load

    result = run_load(live_server, 4, 40, 30.0, model="tiny", version=2, warmup_per_worker=1, words=(1, 3))
    assert result["statuses"] == {"200": 40} and result["ok"] == 40
    assert result["p50_ms"] > 0 and result["batches"] >= 1 and result["mean_batch"] >= 1


def test_http_client_errors_are_oserrors(live_server: str) -> None:
    import asyncio

    from benchmarks.http_client import HTTPConnection

    async def exchange() -> tuple[int, bytes]:
        conn = HTTPConnection(live_server)
        try:
            status, body = await conn.send(conn.request_bytes("POST", "/v1/predict", b'{"text": 5}'))
            assert status == 422 and b"text" in body
            return await conn.send(conn.request_bytes("GET", "/readyz"))  # same connection, kept alive
        finally:
            await conn.close()

    assert asyncio.run(exchange())[0] == 200

    async def refused() -> None:
        from processes import free_port

        await HTTPConnection(f"http://127.0.0.1:{free_port()}").send(b"GET / HTTP/1.1\r\n\r\n")

    with pytest.raises(OSError):
        asyncio.run(refused())


def test_keyboard_replay_against_a_real_server(live_server: str, tmp_path: Path) -> None:
    """Typists on their own WebSocket sessions, one character per message, open loop, in the
    keyboard load generator's own process: every keystroke is answered, none is an error, and
    keystrokes inside a word are told from those completing one."""
    from benchmarks.keyboard import replay, sentences

    texts, source = sentences(0, count=20, root=tmp_path / "no-corpus")
    assert "passage" in source and all(len(t.split()) >= 4 for t in texts)
    result = replay(live_server, 3, texts, seconds=2.0, warmup_s=0.5, interval_ms=40, model="tiny", version=2)
    assert result["error_count"] == 0, result["errors"]
    assert result["answered"] == result["sent"] > 0
    assert result["midword_p50_ms"] > 0 and result["commit_p50_ms"] > 0 and result["p99_ms"] >= result["p50_ms"]
    assert result["client_cpu_cores"] > 0 and result["clients"] == 1


def test_keyboard_floor_app_answers_the_load_generator(tmp_path: Path) -> None:
    """The keyboard section's floor (the same stack answering with no work) speaks the session
    socket's protocol as far as the load generator reads it: every keystroke is answered."""
    from benchmarks.keyboard import FLOOR_APP, replay, sentences
    from benchmarks.server import start_service

    texts, _ = sentences(0, count=10, root=tmp_path / "no-corpus")
    service = start_service(tmp_path / "repo", tmp_path / "logs", threads=1, app=FLOOR_APP, timeout=60)
    try:
        result = replay(service.url, 3, texts, seconds=1.5, warmup_s=0.3, interval_ms=40, server_pid=service.pid)
    finally:
        service.stop()
    assert result["error_count"] == 0, result["errors"]
    assert result["answered"] == result["sent"] > 0
    assert result["server_cpu_cores"] is not None


def test_brown_sentences_are_typed_as_text() -> None:
    from benchmarks.keyboard import detokenize

    assert detokenize(["``", "he", "said", ",", "it", "is", "n't", "(", "so", ")", ".", "''"]) == (
        "he said, it isn't (so)."
    )


def test_readme_rows_of_some_sections_are_replaced_in_place() -> None:
    """``--only keyboard --readme``: the keyboard rows are replaced, every other row stays where
    it was, the targets are recounted and a line says when the new rows were measured."""
    from benchmarks.common import SECTIONS, Row
    from benchmarks.report import markdown_table, merge_sections

    def block(rows: list[Row], summary: str) -> str:
        return f"{summary}\n\n{markdown_table(rows)}\n1 of 2 targets met.\n"

    old = [Row("runtime", "a", 1.0, target="≥ 1", met=True), Row("keyboard", "k old", 1.0, target="≥ 2", met=False),
           Row("training", "t", 2.0)]
    meta = {"command": "python -m benchmarks --only keyboard", "started": "today", "duration_s": 9.0,
            "machine": {"busy_before_start": 0.0, "cpu": "Some CPU", "cores": 2}, "model": {"path": "models/m/1"},
            "json": "bench-results/keyboard.json"}
    new = [Row("keyboard", "k new", 3.0, target="≥ 2", met=True), Row("keyboard", "k level", 4.0)]
    merged = merge_sections(block(old, "Measured by the full run."), meta, new, ["keyboard"], SECTIONS)
    names = [line.split("|")[2].strip() for line in merged.splitlines() if line.startswith("| ")][1:]
    assert names == ["a", "t", "k new", "k level"]
    assert merged.startswith("Measured by the full run.\n\nRows of `keyboard` measured by `python -m benchmarks")
    assert "2 of 2 targets met." in merged
    assert "Some CPU (2 cores), model `models/m/1`; full results `bench-results/keyboard.json`." in merged
    assert merge_sections(merged, meta, new, ["keyboard"], SECTIONS) == merged


def test_suggest_typos_and_the_edit_distance_baseline() -> None:
    """The synthetic typos are one keyboard error of their kind and never a prefix of the word;
    the baseline ranks the typed word itself, then words one edit away in frequency order."""
    from benchmarks.suggest import KINDS, baseline, make_typo
    from service.engine.correct import NEIGHBOURS
    from service.engine.vocab_index import VocabIndex

    rng = np.random.default_rng(0)
    for word in ["president", "occur", "states", "the"]:
        for kind in KINDS:
            typed = make_typo(word, kind, rng)
            assert typed is not None and typed != word
            if kind == "substitute":
                (i,) = [j for j in range(len(word)) if typed[j] != word[j]]
                assert typed[i] in NEIGHBOURS[word[i]]
            elif kind == "transpose":
                assert sorted(typed) == sorted(word) and len(typed) == len(word)
            elif kind == "delete":
                assert len(typed) == len(word) - 1 and not word.startswith(typed)
            else:
                assert len(typed) == len(word) + 1
    vocab = Vocab(["<unk>", "<eos>", "the", "then", "they", "tea", "teh"])
    index = VocabIndex(vocab)
    assert vocab.decode(baseline("teh", index, 3)) == ["teh", "the", "tea"]
    assert vocab.decode(baseline("thq", index, 3)) == ["the"]


BROWN = ROOT.parent / "shared" / "data" / "brown"
COMMON_WORDS = ("the and that was for with his had are not but from have this which they she were her you all one "
                "been their has would there when who will more out them into its said than can only other some what "
                "could time these two may then first any like").split()


@pytest.mark.skipif(not BROWN.is_dir(), reason=f"the Brown corpus is not at {BROWN}")
def test_quick_suggest_benchmark_smoke(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vocab = Vocab([*SPECIAL_TOKENS, *COMMON_WORDS])
    model = LanguageModel(ModelConfig(vocab_size=len(vocab), cell="lstm", embedding_size=8, hidden_size=8,
                                      num_layers=1, tied=True))
    path = export_model(model.eval(), vocab, tmp_path / "models", "tiny", 1)
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "suggest", "--model", str(path),
         "--out", str(out), "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["section"] for row in rows] == ["suggest"] * 5
    assert rows[0]["details"]["cases"] > 0 and 0 <= rows[0]["value"] <= 100


def test_soak_load_against_a_real_server(model_repository: Path, start_server) -> None:
    """The soak's generator: every kind of request of its cycle answered 2xx (sessions deleted with
    204 and recreated), the server's RSS sampled through the timed phase and split into halves."""
    from benchmarks.soak import rss_halves, run_soak_load

    server = start_server(model_repository)
    result = run_soak_load(server.url, clients=4, seconds=3.0, warmup_s=0.5, model="tiny",
                           server_pid=server.proc.pid)
    assert result["errors"] == 0, result["error_samples"]
    kinds = {key.split()[0] for key in result["statuses"]}
    assert {"predict", "update", "score", "generate"} <= kinds, result["statuses"]
    assert len(result["rss"]) >= 4 and all(mb > 10 for _, mb in result["rss"])
    halves = rss_halves(result["rss"])
    assert halves is not None and halves["first_peak_mb"] >= halves["first_median_mb"] > 0


def test_rss_halves() -> None:
    from benchmarks.soak import rss_halves

    assert rss_halves([(0, 100.0), (1, 101.0)]) is None
    flat = rss_halves([(t, 100.0 + (t in (2, 7))) for t in range(10)])  # a momentary peak in each half
    assert flat is not None and flat["growth_mb"] == 0
    leak = rss_halves([(t, 100.0 + 10 * t) for t in range(10)])
    assert leak is not None and leak["growth_mb"] == 50 and leak["second_peak_mb"] == 190
    assert leak["second_half_mb_per_min"] == pytest.approx(600) and flat["second_half_mb_per_min"] < 5


def test_adaptation_text_is_cut_into_typed_words_and_context_marks() -> None:
    """The held-out-domain typist types words (counted) and sends marks and numbers as context."""
    from benchmarks.adaptation import chunks

    pieces = chunks("The GNU GPL, version 3 (or any later) don't.\nEnd", limit=100)
    assert pieces == [("The ", True), ("GNU ", True), ("GPL", True), (", ", False), ("version ", True),
                      ("3 ", False), ("(", False), ("or ", True), ("any ", True), ("later", True), (") ", False),
                      ("don't", False), (". ", False), ("End", True)]
    assert [p for p, typed in chunks("one two three", limit=2) if typed] == ["one ", "two "]


def test_commit_cost_compares_full_and_new_sessions(model_repository: Path, tmp_path: Path) -> None:
    """The adaptation section's commit-cost row runs the real session manager on a real model."""
    from benchmarks.adaptation import commit_cost
    from benchmarks.common import Context

    ctx = Context(model_dir=model_repository / "tiny" / "1", quick=True, threads=1, seed=0, work_dir=tmp_path)
    words = ["the", "quick", "brown", "fox", "zorblat"] * 600
    row = commit_cost(ctx, words)
    assert row.value is not None and row.value > 0, row
    assert row.details["learned_words"] == 2002 and row.details["commits_per_arm"] == 20
    assert row.details["full_ms"] > 0 and row.details["new_ms"] > 0
    assert commit_cost(ctx, words[:100]).display == "not measured"
