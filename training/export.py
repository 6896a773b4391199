"""Export a trained model into the model repository (``models/<name>/<version>/``), checking
onnxruntime against torch before the version is written (see ``models/README.md``): from a model
in memory (:func:`export_model`; a training run's checkpoint and provenance: :func:`load_run`,
:func:`run_provenance`), and the exported version's evaluation written into its card
(:func:`evaluate_export`)."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from nextword import artifact as A
from nextword.casing import CaseCounts
from nextword.vocab import Vocab
from training.casing import write_casing_file
from training.evaluate import evaluate_artifact, evaluate_predict_graph
from training.model import LanguageModel, ModelConfig
from training.onnx_graph import OPSET, build_graph
from training.train import CheckpointError

PARITY_TOLERANCE = 1e-4


class ExportError(Exception):
    """onnxruntime disagrees with torch beyond tolerance, or the target already exists."""


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(model: LanguageModel, tokens: np.ndarray, lengths: np.ndarray, state: dict[str, np.ndarray]) -> dict:
    feeds = {A.TOKENS: tokens.astype(np.int64), A.LENGTHS: lengths.astype(np.int64)}
    feeds.update({A.state_input(k): v.astype(np.float32) for k, v in state.items()})
    return feeds


@torch.no_grad()
def _torch_row(model: LanguageModel, ids: np.ndarray, state: tuple[torch.Tensor, ...]):
    log_probs, new_state = model(torch.from_numpy(ids[None].astype(np.int64)), state)
    return log_probs[0, -1].numpy(), [s.numpy() for s in new_state]


def parity_report(model: LanguageModel, predict_path: Path, seed: int = 0) -> dict[str, float]:
    """Max |Δ| of onnxruntime vs torch on a ragged batch with random initial state, of one
    token at a time through the state vs all at once, and of padding vs no padding."""
    model.eval()
    rng = np.random.default_rng(seed)
    cfg = model.cfg
    sess = _session(predict_path)
    lengths = np.array([7, 1, 4, 11])
    B, T = len(lengths), int(lengths.max())
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T))
    state = {
        s: rng.normal(0, 0.5, size=(cfg.num_layers, B, cfg.hidden_size)).astype(np.float32) for s in cfg.state_names
    }
    # padding carries garbage ids on purpose: it must never matter
    ort_lp, *ort_state = sess.run(None, _feeds(model, tokens, lengths, state))
    vs_torch = 0.0
    for row, n in enumerate(lengths):
        row_state = tuple(torch.from_numpy(state[s][:, row : row + 1].copy()) for s in cfg.state_names)
        lp, st = _torch_row(model, tokens[row, :n], row_state)
        vs_torch = max(vs_torch, float(np.abs(lp - ort_lp[row]).max()))
        for k, s in enumerate(st):
            vs_torch = max(vs_torch, float(np.abs(s[:, 0] - ort_state[k][:, row]).max()))
    # stepwise: feed row 3 one token at a time through the state tensors
    row = 3
    st = {s: state[s][:, row : row + 1] for s in cfg.state_names}
    for t in range(lengths[row]):
        lp, *new = sess.run(None, _feeds(model, tokens[row : row + 1, t : t + 1], np.array([1]), st))
        st = dict(zip(cfg.state_names, new, strict=True))
    stepwise = float(np.abs(lp[0] - ort_lp[row]).max())
    # padding: the same row alone, unpadded
    alone = sess.run(
        None, _feeds(model, tokens[:1, : lengths[0]], lengths[:1], {s: state[s][:, :1] for s in cfg.state_names})
    )
    padding = float(np.abs(alone[0][0] - ort_lp[0]).max())
    return {"onnxruntime_vs_torch": vs_torch, "stepwise_vs_full": stepwise, "padding": padding}


def _quantize(model: LanguageModel, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Quantize from float32 initializers (the float16 storage path hides weights behind Casts).
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "predict.fp32.onnx"
        onnx.save(build_graph(model, "predict", "float32"), src)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _share_weights(protos: list[onnx.ModelProto], directory: Path, min_bytes: int = 1024) -> str:
    """Move large initializers of all graphs into one external file, each distinct tensor stored
    once: the predict and score graphs hold the same weights, and the repository stays small."""
    offsets: dict[bytes, tuple[int, int]] = {}
    with (directory / A.WEIGHTS_FILE).open("wb") as fh:
        for proto in protos:
            for tensor in proto.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < min_bytes:
                    continue
                key = hashlib.sha256(raw).digest()
                if key not in offsets:
                    offsets[key] = (fh.tell(), len(raw))
                    fh.write(raw)
                    fh.write(b"\0" * (-len(raw) % 64))  # keep tensors aligned
                offset, length = offsets[key]
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", A.WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
    return A.WEIGHTS_FILE


def next_version(repository: Path, name: str) -> int:
    versions = A.version_dirs(repository).get(name, {})
    return max(versions, default=0) + 1


def export_model(
    model: LanguageModel,
    vocab: Vocab,
    repository: str | Path,
    name: str,
    version: int | None = None,
    *,
    weights_dtype: str = "float32",
    quantize: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    casing: CaseCounts | None = None,
) -> Path:
    """Write ``repository/name/version`` (next free version by default) and return its path.

    With ``weights_dtype="float16"`` the weights are rounded to half precision *in the torch
    model too* before the parity check, so the stored model is exactly the one checked (and the
    one whose metrics the card reports when they are measured after export)."""
    if not A.NAME_RE.match(name):
        raise ExportError(f"model name {name!r} must match {A.NAME_RE.pattern}")
    if len(vocab) != model.cfg.vocab_size:
        raise ExportError(f"vocabulary has {len(vocab)} words, model expects {model.cfg.vocab_size}")
    repository = Path(repository)
    version = version or next_version(repository, name)
    target = repository / name / str(version)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists")
    model = copy.deepcopy(model).eval()
    if weights_dtype == "float16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=repository if repository.exists() else None))
    try:
        graphs = {"predict": A.PREDICT_GRAPH, "score": A.SCORE_GRAPH}
        protos = {kind: build_graph(model, kind, weights_dtype) for kind in graphs}
        _share_weights(list(protos.values()), tmp)
        for kind, file in graphs.items():
            onnx.save(protos[kind], tmp / file)
        parity = parity_report(model, tmp / A.PREDICT_GRAPH)
        if max(parity.values()) > PARITY_TOLERANCE:
            raise ExportError(f"onnxruntime parity check failed: {parity}")
        export_info: dict[str, Any] = {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "opset": OPSET,
            "parity_max_abs": parity,
            "tolerance": PARITY_TOLERANCE,
        }
        if quantize == "int8":
            _quantize(model, tmp / A.PREDICT_INT8_GRAPH)
            graphs["predict_int8"] = A.PREDICT_INT8_GRAPH
            export_info["int8_vs_fp32_max_abs"] = _int8_delta(model, tmp)
        vocab.save(tmp / A.VOCAB_FILE)
        casing_file = write_casing_file(tmp, casing, vocab) if casing is not None else None
        cfg = model.cfg
        card = A.ModelCard(
            name=name,
            version=version,
            cell=cfg.cell,
            num_layers=cfg.num_layers,
            embedding_size=cfg.embedding_size,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            state_names=cfg.state_names,
            graphs=graphs,
            data_files=[A.WEIGHTS_FILE],
            tied=cfg.tied,
            zoneout=cfg.zoneout,
            weights_dtype=weights_dtype,
            casing_file=casing_file,
            training=training or {},
            metrics=metrics or {},
            export=export_info,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        A.write_card(tmp, card)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
        tmp.rename(target)  # a watcher never sees a half-written version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _int8_delta(model: LanguageModel, directory: Path) -> float:
    rng = np.random.default_rng(1)
    cfg = model.cfg
    tokens = rng.integers(0, cfg.vocab_size, size=(4, 16))
    lengths = np.array([16, 9, 3, 12])
    state = {s: np.zeros((cfg.num_layers, 4, cfg.hidden_size), np.float32) for s in cfg.state_names}
    a = _session(directory / A.PREDICT_GRAPH).run(None, _feeds(model, tokens, lengths, state))[0]
    b = _session(directory / A.PREDICT_INT8_GRAPH).run(None, _feeds(model, tokens, lengths, state))[0]
    return float(np.abs(a - b).max())


def load_run(run: Path) -> tuple[LanguageModel, Vocab]:
    """The best checkpoint of a training run directory and its vocabulary."""
    ckpt_path = run / "best.pt"
    if not ckpt_path.exists():
        raise CheckpointError(f"{ckpt_path} does not exist (train with --out {run} first)")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = LanguageModel(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model, Vocab.load(run / "vocab.txt")


def run_config(run: Path) -> dict[str, Any]:
    """A training run's ``config.json``."""
    return json.loads((run / "config.json").read_text())


def run_provenance(run: Path, command: str | None = None) -> dict[str, Any]:
    """What the model card records of how a run was trained (from its summary and config)."""
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    config = run_config(run)
    return {
        "corpus": summary.get("corpus"),
        "protocol": summary.get("protocol"),
        "config": config,
        "train_minutes": summary.get("train_minutes"),
        "steps": summary.get("steps"),
        "parameters": summary.get("parameters"),
        "best_epoch": summary.get("best_epoch"),
        "command": command or config.get("command"),
    }


def evaluate_export(
    target: Path,
    splits: dict[str, list[str]],
    threads: int | None = None,
    ngram: tuple[int, dict[str, dict[str, Any]]] | None = None,
) -> None:
    """Evaluate an exported version on the ``valid`` and ``test`` word lists and write the figures
    into its card: perplexity and top-k accuracy, the int8 graph's accuracy beside the float
    graph's when there is one, and with ``ngram`` (order, its result per split) the KN baseline."""
    card = A.read_card(target)
    metrics: dict[str, Any] = {}
    for split in ("valid", "test"):
        metrics[split] = evaluate_artifact(target, splits[split], threads=threads)
        if ngram:
            metrics[f"{split}_kn{ngram[0]}"] = ngram[1][split]
    if "predict_int8" in card.graphs:
        # The int8 graph has no score graph: compare it with the float graph position by position.
        valid = splits["valid"]
        card.export["int8_accuracy"] = {
            "positions": 2048,
            "window": 32,
            "split": "valid",
            "fp32": evaluate_predict_graph(target, card.graphs["predict"], valid),
            "int8": evaluate_predict_graph(target, card.graphs["predict_int8"], valid),
        }
    if ngram:
        metrics["test_ppl_ratio_vs_kn"] = metrics["test"]["ppl"] / metrics[f"test_kn{ngram[0]}"]["ppl"]
    card.metrics = metrics
    A.write_card(target, card)
