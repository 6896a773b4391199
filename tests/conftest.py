"""Shared fixtures: tiny exported models, service settings, and real uvicorn servers.

* ``model_repository`` (session): a read-only repository with ``tiny`` (lstm, versions 1 and 2)
  and ``tinygru`` (gru, version 1), exported by ``training.export.export_model`` like any model.
* ``repository_copy``: a private, writable copy of it (for reload / corruption tests).
* ``export_version``: export another tiny version into any repository.
* ``service_settings``: ``Settings`` for a repository, test-friendly (1 thread, no polling).
* ``live_server`` (module): uvicorn serving ``model_repository``; ``start_server``: a factory
  for servers with their own repository and ``NEXTWORD_*`` environment.
* ``reference``: next-word log-probs and scores computed directly with onnxruntime.

torch is imported lazily (only to export models), so the service itself is tested torch-free.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from processes import Process, free_port

ROOT = Path(__file__).resolve().parents[1]

# A vocabulary with shared prefixes (th-, app-, qu-), punctuation and multi-part words.
TINY_WORDS = (
    "the . , a of and to in he she it was is that then there their they them this these those though "
    "through thought apple apply application applied quick quiet quite queen brown fox jumps over lazy dog "
    "cat sat on mat don't u.s. mr. 1960s said had not but for with as his her at by from have an be i you we"
).split()


def tiny_vocab() -> Any:
    from nextword.text import SPECIAL_TOKENS
    from nextword.vocab import Vocab

    return Vocab([*SPECIAL_TOKENS, *dict.fromkeys(TINY_WORDS)])


def _export(repository: Path, name: str, version: int | None, cell: str = "lstm", seed: int = 0) -> Path:
    torch = pytest.importorskip("torch")
    from training.export import export_model
    from training.model import LanguageModel, ModelConfig

    vocab = tiny_vocab()
    torch.manual_seed(seed)
    model = LanguageModel(
        ModelConfig(vocab_size=len(vocab), cell=cell, embedding_size=16, hidden_size=16, num_layers=2)
    )
    # Random weights give a near-uniform distribution; scale them up so predictions differ by
    # context and ties are rare (tests compare rankings).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    metrics = {"test": {"perplexity": 42.0, "top1": 0.1}}
    return export_model(model, vocab, repository, name, version, metrics=metrics)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    _export(root, "tiny", 1, "lstm", seed=1)
    _export(root, "tiny", 2, "lstm", seed=2)
    _export(root, "tinygru", 1, "gru", seed=3)
    return root


@pytest.fixture
def repository_copy(model_repository: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(model_repository, target)
    return target


@pytest.fixture
def export_version() -> Callable[..., Path]:
    """``export_version(repository, name, version=None, cell="lstm", seed=0) -> version dir``."""
    return _export


@pytest.fixture
def service_settings() -> Callable[..., Any]:
    def make(repository: Path, **overrides: Any) -> Any:
        from service.config import Settings

        values: dict[str, Any] = {
            "model_repository": repository, "device": "cpu", "intra_op_threads": 1,
            "reload_interval_seconds": 0, "log_level": "warning",
        }
        values.update(overrides)
        return Settings(**values)

    return make


# --------------------------------------------------------------------------- direct onnxruntime


@dataclass
class Reference:
    """What the service must answer, computed without it: one row at a time, zero state."""

    repository: Path

    def _session(self, name: str, version: int, graph: str) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(str(self.repository / name / str(version) / f"{graph}.onnx"), opts,
                                    providers=["CPUExecutionProvider"])

    def vocab(self, name: str, version: int) -> Any:
        from nextword.vocab import Vocab

        return Vocab.load(self.repository / name / str(version) / "vocab.txt")

    def _states(self, name: str, version: int) -> dict[str, np.ndarray]:
        from nextword.artifact import read_card

        card = read_card(self.repository / name / str(version))
        return {f"state_{s}": np.zeros((card.num_layers, 1, card.hidden_size), np.float32) for s in card.state_names}

    def log_probs(self, name: str, version: int, words: list[str]) -> np.ndarray:
        vocab = self.vocab(name, version)
        ids = np.array([[vocab.eos_id, *vocab.encode(words)]], dtype=np.int64)
        feeds = {"tokens": ids, "lengths": np.array([ids.shape[1]], np.int64), **self._states(name, version)}
        return self._session(name, version, "predict").run(["log_probs"], feeds)[0][0]

    def top_words(self, name: str, version: int, words: list[str], k: int, prefix: str = "") -> list[tuple[str, float]]:
        """(word, probability) best first, <unk>/<eos> excluded, renormalised over prefix matches."""
        vocab = self.vocab(name, version)
        lp = self.log_probs(name, version, words).astype(np.float64)
        eligible = [i for i, w in enumerate(vocab.itos) if not vocab.is_special(w) and w.startswith(prefix)]
        probs = np.exp(lp[eligible])
        if prefix:
            probs = probs / probs.sum()
        order = sorted(range(len(eligible)), key=lambda j: (-probs[j], eligible[j]))[:k]
        return [(vocab.itos[eligible[j]], float(probs[j])) for j in order]

    def score(self, name: str, version: int, words: list[str]) -> np.ndarray:
        vocab = self.vocab(name, version)
        ids = vocab.encode(words)
        tokens = np.array([[vocab.eos_id, *ids[:-1]]], dtype=np.int64)
        feeds = {"tokens": tokens, "lengths": np.array([len(ids)], np.int64),
                 "targets": np.array([ids], np.int64), **self._states(name, version)}
        return self._session(name, version, "score").run(["target_log_probs"], feeds)[0][0]


@pytest.fixture(scope="session")
def reference(model_repository: Path) -> Reference:
    return Reference(model_repository)


# --------------------------------------------------------------------------- real uvicorn servers


class Server(Process):
    """A uvicorn process and the base URL it serves."""

    def __init__(self, url: str, name: str, argv: list[str], log_dir: Path, **kwargs: Any) -> None:
        super().__init__(name, argv, log_dir, **kwargs)
        self.url = url


def _start_server(repository: Path, log_dir: Path, env: dict[str, str] | None = None,
                  ready: bool = True, timeout: float = 60.0, cli: bool = False, port: int | None = None) -> Server:
    """``python -m uvicorn service.main:app`` (or, with ``cli``, the ``nextword-serve`` entry point
    ``python -m service.cli``) on a free port (or ``port``: a restart); waits for /readyz (or /healthz)."""
    import httpx

    port = port or free_port()
    full_env = {
        **os.environ,
        "NEXTWORD_MODEL_REPOSITORY": str(repository),
        "NEXTWORD_DEVICE": "cpu",
        "NEXTWORD_INTRA_OP_THREADS": "1",
        "NEXTWORD_RELOAD_INTERVAL_SECONDS": "0",
        "NEXTWORD_LOG_LEVEL": "warning",
        "NEXTWORD_HOST": "127.0.0.1",
        "NEXTWORD_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    if cli:
        argv = [sys.executable, "-m", "service.cli"]
    else:
        argv = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--no-access-log"]
    server = Server(f"http://127.0.0.1:{port}", f"uvicorn-{port}", argv, log_dir, env=full_env, cwd=ROOT)
    proc = server.proc
    probe = "/readyz" if ready else "/healthz"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + probe, timeout=2).status_code == 200:
                return server
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"uvicorn not ready after {timeout:.0f}s:\n{server.log_tail()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real uvicorn serving the shared (read-only) ``model_repository``."""
    server = _start_server(model_repository, tmp_path_factory.mktemp("uvicorn-logs"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(repository, env={...}, ready=True, cli=False, port=None) -> Server``; all stopped
    afterwards."""
    servers: list[Server] = []

    def start(repository: Path, env: dict[str, str] | None = None, ready: bool = True, cli: bool = False,
              port: int | None = None) -> Server:
        server = _start_server(repository, tmp_path / "logs", env, ready, cli=cli, port=port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
