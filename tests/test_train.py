"""Training end to end on a tiny synthetic corpus: outputs, learning, determinism, resume,
sampled softmax, plots, data-parallel training under torchrun, and the ``nextword-train`` CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nextword import artifact as A  # noqa: E402
from nextword.vocab import Vocab  # noqa: E402
from training.cli import main  # noqa: E402
from training.model import LanguageModel, ModelConfig  # noqa: E402
from training.train import CheckpointError, TrainConfig, evaluate, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"cell": "lstm", "embedding_size": 16, "hidden_size": 16, "num_layers": 1}
TINY_ARGS = ["--corpus-format", "ptb", "--embedding-size", "16", "--hidden-size", "16", "--num-layers", "1",
             "--batch-size", "8", "--bptt", "12", "--lr", "0.01", "--warmup-steps", "5", "--log-every", "5",
             "--threads", "1"]


def _sentences(rng: np.random.Generator, n: int) -> str:
    """A tiny grammar: predictable structure (so a model can learn it) plus a few rare words."""
    nouns, verbs = "cat dog bird fish man woman".split(), "sees likes eats chases".split()
    adjs = "big small red".split()
    lines = []
    for _ in range(n):
        words = ["the", str(rng.choice(adjs)), str(rng.choice(nouns)), str(rng.choice(verbs)), "the",
                 str(rng.choice(nouns))]
        if rng.random() < 0.3:
            words += ["and", "the", str(rng.choice(nouns)), str(rng.choice(verbs))]
        if rng.random() < 0.05:
            words.append(f"rare{rng.integers(1000)}")
        lines.append(" ".join(words) + " .")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-corpus")
    rng = np.random.default_rng(0)
    for split, n in (("train", 500), ("valid", 70), ("test", 70)):
        (root / f"tiny.{split}.txt").write_text(_sentences(rng, n))
    return root


def tiny_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    cfg = TrainConfig(corpus=str(corpus), out_dir=str(out), corpus_format="ptb", batch_size=8, bptt=12, epochs=2,
                      lr=1e-2, warmup_steps=5, log_every=5, eval_bptt=32, threads=1, seed=0, model=dict(TINY_MODEL))
    return replace(cfg, **overrides)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    return out, train(tiny_config(corpus, out))


def test_train_writes_run_directory(trained) -> None:
    out, summary = trained
    for name in ("last.pt", "best.pt", "vocab.txt", "config.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    records = read_jsonl(out / "metrics.jsonl")
    events = [r["event"] for r in records]
    assert events.count("valid") == 2 and events.count("test") == 1 and events.count("train") >= 4
    assert events[-1] == "test"
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps == sorted(train_steps) and all(s % 5 == 0 for s in train_steps)
    for r in records:
        if r["event"] == "train":
            assert {"epoch", "step", "loss", "ppl", "tokens_per_s", "lr", "exact_softmax"} <= r.keys()
            assert math.isclose(r["ppl"], math.exp(r["loss"]), rel_tol=1e-9)
        if r["event"] in ("valid", "test"):
            assert {"ppl", "nll", "top1", "top3", "top5", "tokens"} <= r.keys()
    assert [r["epoch"] for r in records if r["event"] == "valid"] == [0, 1]
    vocab = Vocab.load(out / "vocab.txt")
    assert summary["vocab_size"] == len(vocab) and vocab.itos[:2] == ["<unk>", "<eos>"]
    assert all(not w.startswith("rare") for w in vocab.itos)  # min count 3
    assert summary["processes"] == 1 and summary["protocol"] == "ptb-dir"
    assert summary["best_valid_ppl"] == min(r["ppl"] for r in records if r["event"] == "valid")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["hidden_size"] == 16 and config["train"]["corpus_format"] == "ptb"
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last["step"] == summary["steps"]


def test_training_lowers_validation_perplexity(trained, corpus: Path) -> None:
    out, summary = trained
    from training.data import load_corpus

    vocab = Vocab.load(out / "vocab.txt")
    valid = vocab.encode(load_corpus(corpus, "ptb").valid)
    torch.manual_seed(0)
    fresh = evaluate(LanguageModel(ModelConfig(vocab_size=len(vocab), **TINY_MODEL)), valid)
    assert fresh["ppl"] > 0.8 * len(vocab)  # an untrained model is close to uniform
    assert summary["valid"]["ppl"] < 0.5 * fresh["ppl"]
    assert summary["valid"]["top1"] > fresh["top1"]
    assert summary["test"]["ppl"] < 0.5 * fresh["ppl"]


def _numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "train_minutes"}


def test_same_seed_same_run(trained, corpus: Path, tmp_path: Path) -> None:
    out, summary = trained
    again = train(tiny_config(corpus, tmp_path / "again"))
    assert _numbers(again) == _numbers(summary)
    a = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "again" / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train(tiny_config(corpus, tmp_path / "seed1", seed=1, epochs=1))
    assert other["valid"]["ppl"] != summary["valid"]["ppl"]


def test_resume_continues_steps(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(tiny_config(corpus, out, epochs=1))
    assert read_jsonl(out / "metrics.jsonl")[-1]["event"] == "test"
    second = train(tiny_config(corpus, out, epochs=2), resume=True)
    assert second["steps"] == 2 * first["steps"]
    valid = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "valid"]
    assert [r["epoch"] for r in valid] == [0, 1]  # the log continues, it is not rewritten
    assert valid[1]["step"] == second["steps"]
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 1


def test_interrupted_run_resumes_exactly(trained, corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """Stopping after epoch 1 and resuming gives the same model as never stopping."""
    _, summary = trained
    import training.train as T

    calls = {"n": 0}
    real = T.evaluate

    class Interrupted(Exception):
        pass

    def evaluate_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # end of the second epoch, before its checkpoint
            raise Interrupted
        return real(*args, **kwargs)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(T, "evaluate", evaluate_then_die)
        with pytest.raises(Interrupted):
            train(tiny_config(corpus, out))
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 0
    resumed = train(tiny_config(corpus, out), resume=True)
    assert _numbers(resumed) == _numbers(summary)


def test_incompatible_checkpoint(trained, corpus: Path, tmp_path: Path) -> None:
    out, _ = trained
    bigger = tiny_config(corpus, out, model={**TINY_MODEL, "hidden_size": 24})
    with pytest.raises(CheckpointError, match="does not match"):
        train(bigger, resume=True)
    with pytest.raises(CheckpointError, match="bptt"):
        train(tiny_config(corpus, out, bptt=7), resume=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_config(corpus, tmp_path / "empty"), resume=True)


def test_sampled_softmax_then_full(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "sampled"
    summary = train(tiny_config(corpus, out, softmax="sampled", samples=8, full_softmax_epochs=1))
    records = read_jsonl(out / "metrics.jsonl")
    exact_by_epoch = {r["epoch"]: r["exact_softmax"] for r in records if r["event"] == "train"}
    assert exact_by_epoch == {0: False, 1: True}
    assert [r["exact_softmax"] for r in records if r["event"] == "valid"] == [False, True]
    assert math.isfinite(summary["test"]["ppl"]) and summary["test"]["ppl"] < summary["vocab_size"]


def test_plot_run(trained, tmp_path: Path) -> None:
    from training.plot import plot_run

    out, _ = trained
    png = plot_run(out, tmp_path / "curves.png")
    assert png == tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.slow
def test_ddp_under_torchrun(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training", "train", "--corpus", str(corpus), *TINY_ARGS, "--epochs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    # the stream is cut into batch x processes = 16 columns; each process steps through its 8
    assert summary["steps"] == math.ceil((summary["train_tokens"] // 16 - 1) / 12)
    assert math.isfinite(summary["test"]["ppl"])
    assert (out / "best.pt").is_file() and (out / "metrics.jsonl").is_file()


# --------------------------------------------------------------------------- CLI


def test_cli_help() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "eval", "export", "ngram", "plot", "compare"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("train", ["--corpus", "--corpus-format", "--cell", "--zoneout", "--softmax", "--out", "--resume", "--seed"]),
        ("eval", ["--model", "--corpus", "--split", "--ngram-order"]),
        ("export", ["--run", "--repository", "--name", "--version", "--weights-dtype", "--quantize", "--overwrite"]),
        ("ngram", ["--corpus", "--order", "--max-eval-tokens"]),
        ("plot", ["run", "--out"]),
        ("compare", ["--cells", "--minutes", "--compare-zoneout", "--out"]),
    ],
)
def test_cli_subcommand_help(command: str, options: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out, option


def test_cli_missing_corpus_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli("train", "--corpus", str(tmp_path / "nope"), "--corpus-format", "ptb", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fmt", ["brown", "ptb", "text"])
def test_cli_empty_corpus_directory(fmt: str, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--corpus", str(empty), "--corpus-format", fmt, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(empty) in err
    assert main(["ngram", "--corpus", str(empty), "--corpus-format", fmt]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_cli_resume_incompatible_is_a_clear_error(trained, corpus: Path, capsys) -> None:
    out, _ = trained
    rc = main(["train", "--corpus", str(corpus), *TINY_ARGS, "--hidden-size", "24", "--out", str(out), "--resume"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: checkpoint model")


def test_cli_export_without_checkpoint(tmp_path: Path) -> None:
    proc = run_cli("export", "--run", str(tmp_path), "--name", "x", "--repository", str(tmp_path / "models"))
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "best.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models").exists()


def test_cli_export_then_eval(trained, corpus: Path, tmp_path: Path, capsys) -> None:
    out, summary = trained
    repo = tmp_path / "models"
    assert main(["export", "--run", str(out), "--repository", str(repo), "--name", "tiny", "--corpus", str(corpus),
                 "--corpus-format", "ptb", "--ngram-order", "0", "--threads", "1"]) == 0
    target = repo / "tiny" / "1"
    assert capsys.readouterr().out.strip().endswith(str(target))
    card = A.read_card(target)
    A.verify_files(target, card)
    assert card.training["corpus"] == summary["corpus"] and card.training["steps"] == summary["steps"]
    # onnxruntime over the stream equals torch's evaluation of the same best checkpoint
    assert math.isclose(card.metrics["test"]["ppl"], summary["test"]["ppl"], rel_tol=1e-4)
    assert math.isclose(card.metrics["valid"]["ppl"], summary["valid"]["ppl"], rel_tol=1e-4)
    assert card.metrics["test"]["top1"] == pytest.approx(summary["test"]["top1"], abs=2e-3)

    report = tmp_path / "report.json"
    assert main(["eval", "--model", str(target), "--corpus", str(corpus), "--corpus-format", "ptb",
                 "--split", "valid", "test", "--ngram-order", "2", "--json", str(report)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["split", "model", "ppl", "top1", "top3", "top5", "tokens"]
    rows = {(parts[0], parts[1]): parts for parts in (line.split() for line in lines[1:])}
    assert {("valid", "model"), ("valid", "kn2"), ("valid", "ratio"), ("test", "model"), ("test", "kn2")} <= rows.keys()
    assert float(rows[("test", "model")][2]) == pytest.approx(summary["test"]["ppl"], abs=0.01)
    data = json.loads(report.read_text())
    assert data["test"]["model"]["tokens"] == summary["test"]["tokens"]


def test_cli_existing_version_and_missing_model_are_clear_errors(trained, corpus: Path, tmp_path: Path,
                                                                 capsys) -> None:
    out, _ = trained
    repo = tmp_path / "models"
    args = ["export", "--run", str(out), "--repository", str(repo), "--name", "tiny", "--version", "3", "--no-evaluate"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2  # refuses to replace a version without --overwrite
    err = capsys.readouterr().err
    assert err.startswith("error:") and "already exists" in err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(repo / "tiny" / "9"), "--corpus", str(corpus), "--corpus-format", "ptb",
                 "--ngram-order", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model.json" in err


@pytest.mark.slow
def test_cli_compare(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare"
    assert main(["compare", "--corpus", str(corpus), *TINY_ARGS, "--cells", "rnn", "lstm", "--minutes", "0.05",
                 "--epochs", "2", "--max-eval-tokens", "200", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| rnn |" in table and "| lstm |" in table
    results = json.loads((out / "results.json").read_text())
    assert [r["cell"] for r in results] == ["rnn", "lstm"]
    assert all(r["step_ms"] > 0 and math.isfinite(r["valid_ppl"]) for r in results)
    for cell in ("rnn", "lstm"):
        A.verify_files(out / "repository" / cell / "1", A.read_card(out / "repository" / cell / "1"))


@pytest.mark.slow
def test_cli_compare_ablation_entries_and_resume(corpus: Path, tmp_path: Path, capsys) -> None:
    """'-x' entries switch one technique off; a second run with the same settings reuses finished
    entries (so two processes can split the work), and a changed setting retrains."""
    out = tmp_path / "compare"
    base = ["compare", "--corpus", str(corpus), *TINY_ARGS, "--epochs", "1", "--max-eval-tokens", "200",
            "--weight-drop", "0.2", "--ar", "1", "--out", str(out)]
    assert main([*base, "--cells", "lstm-weightdrop-artar"]) == 0
    flat = json.dumps(json.loads((out / "lstm-no-weightdrop-no-artar" / "config.json").read_text()))
    assert '"weight_drop": 0.0' in flat and '"ar": 0.0' in flat
    assert main([*base, "--cells", "lstm", "lstm-weightdrop-artar"]) == 0
    assert "lstm-weightdrop-artar: reusing" in capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert "| lstm |" in table and "weight drop 0.2" in table
    assert "Ablation on lstm" in table and "| lstm without weightdrop, artar |" in table.split("Ablation")[1]
    assert [r["cell"] for r in json.loads((out / "results.json").read_text())] == ["lstm", "lstm-weightdrop-artar"]
    assert main([*base[:-2], "--seed", "3", "--out", str(out), "--cells", "lstm-weightdrop-artar"]) == 0
    assert "reusing" not in capsys.readouterr().out
    assert main([*base, "--cells", "lstm-zoneout"]) == 2
    assert "unknown entry 'lstm-zoneout'" in capsys.readouterr().err


def test_cli_trains_on_one_text_file_and_export_finds_it(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--corpus my.txt`` alone trains (split by line); export, run from another directory
    without ``--corpus``, evaluates on the same corpus the run was trained on."""
    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(5)
    (work / "my.txt").write_text(_sentences(rng, 400).replace(" .", "."))
    monkeypatch.chdir(work)
    args = [a for a in TINY_ARGS if a not in ("--corpus-format", "ptb")]
    assert main(["train", "--corpus", "my.txt", *args, "--epochs", "1", "--out", "run"]) == 0
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["protocol"] == "text-lines/1" and summary["corpus"] == "my"
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # "my.txt" no longer resolves from here
    assert main(["export", "--run", str(work / "run"), "--repository", "models", "--name", "mine", "--ngram-order",
                 "0", "--threads", "1"]) == 0
    card = A.read_card(tmp_path / "models" / "mine" / "1")
    assert math.isclose(card.metrics["valid"]["ppl"], summary["valid"]["ppl"], rel_tol=1e-4)
    assert card.metrics["test"]["tokens"] == summary["test"]["tokens"]
