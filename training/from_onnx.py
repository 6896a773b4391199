"""Rebuild the torch :class:`~training.model.LanguageModel` from an exported artifact.

The benchmarks compare torch eager with onnxruntime "on the same weights": the weights the
service really serves are the ONNX initializers of ``predict.onnx`` (possibly stored as float16
in ``weights.bin`` behind ``Cast`` nodes), not a training checkpoint that may have been
re-exported or rounded since. :func:`torch_model_from_artifact` reads them back and undoes what
:mod:`training.onnx_graph` did to them:

* ONNX ``LSTM`` gate order (i, o, f, c) → PyTorch (i, f, g, o); the bias ``B`` is
  ``[W_b | R_b]``; CIFG (``input_forget=1``) drops the unused forget block; peepholes
  ``P = [p_i, p_o, p_f]`` → ``peephole_l{k}`` rows (p_i, p_f, p_o);
* ONNX ``GRU`` (z, r, n) → PyTorch (r, z, n); ``RNN`` is stored as is;
* the decoder ``Gemm`` (``transB=1``) gives the decoder weight and bias (the embedding itself
  when tied) and a ``MatMul`` before it the tied model's projection.

Supported: ``lstm``, ``gru``, ``rnn``, ``peephole`` and ``cifg`` without zoneout, tied or untied.
Zoneout cells (one ``Scan`` per layer) and ``highway`` raise :class:`FromOnnxError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from nextword import artifact as A
from training.model import LanguageModel, ModelConfig

SUPPORTED_CELLS = ("lstm", "gru", "rnn", "peephole", "cifg")
_RECURRENT_OPS = {"lstm": "LSTM", "peephole": "LSTM", "cifg": "LSTM", "gru": "GRU", "rnn": "RNN"}


class FromOnnxError(ValueError):
    """The artifact cannot be turned back into a torch model (unsupported cell or unexpected graph)."""


class _Values:
    """Constant tensors of a graph: initializers, plus ``Cast``/``Identity`` of a constant (the
    float16 storage path stores ``<name>_f16`` and casts it to float32 once)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type in ("Cast", "Identity") and node.input and node.input[0] in self.arrays:
                self.arrays[node.output[0]] = self.arrays[node.input[0]].astype(np.float32)

    def get(self, name: str, what: str) -> np.ndarray:
        if name not in self.arrays:
            raise FromOnnxError(f"{what} ({name!r}) is not a constant of the graph")
        return self.arrays[name].astype(np.float32)


def _from_lstm_order(w: np.ndarray, cell: str) -> np.ndarray:
    """ONNX (i, o, f, c) blocks → PyTorch (i, f, g, o), or (i, g, o) for CIFG."""
    i, o, f, c = np.split(w, 4)
    return np.concatenate([i, c, o] if cell == "cifg" else [i, f, c, o])


def _from_gru_order(w: np.ndarray) -> np.ndarray:
    z, r, n = np.split(w, 3)
    return np.concatenate([r, z, n])


def _layer_params(cell: str, node: onnx.NodeProto, values: _Values, layer: int) -> dict[str, np.ndarray]:
    W = values.get(node.input[1], f"layer {layer} W")[0]
    R = values.get(node.input[2], f"layer {layer} R")[0]
    B = values.get(node.input[3], f"layer {layer} B")[0]
    b_w, b_r = np.split(B, 2)
    if cell in ("lstm", "peephole", "cifg"):
        reorder = lambda a: _from_lstm_order(a, cell)  # noqa: E731
    elif cell == "gru":
        reorder = _from_gru_order
    else:
        reorder = lambda a: a  # noqa: E731
    out = {"weight_ih": reorder(W), "weight_hh": reorder(R), "bias_ih": reorder(b_w), "bias_hh": reorder(b_r)}
    if cell == "peephole":
        if len(node.input) < 8 or not node.input[7]:
            raise FromOnnxError(f"layer {layer}: a peephole LSTM node without its P input")
        p_i, p_o, p_f = np.split(values.get(node.input[7], f"layer {layer} P")[0], 3)
        out["peephole"] = np.stack([p_i, p_f, p_o])
    return out


def _check_attrs(cell: str, node: onnx.NodeProto, layer: int) -> None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("direction", b"forward") not in (b"forward", "forward"):
        raise FromOnnxError(f"layer {layer}: only forward recurrences are supported")
    if cell == "gru" and attrs.get("linear_before_reset", 0) != 1:
        raise FromOnnxError(f"layer {layer}: GRU without linear_before_reset=1 is not PyTorch's GRU")
    if cell == "cifg" and attrs.get("input_forget", 0) != 1:
        raise FromOnnxError(f"layer {layer}: a cifg model whose LSTM node lacks input_forget=1")
    if cell == "rnn" and [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [b"Tanh"])] != [
        "Tanh"
    ]:
        raise FromOnnxError(f"layer {layer}: only tanh RNNs are supported")


def _assign(param: torch.nn.Parameter, value: np.ndarray, what: str) -> None:
    if tuple(param.shape) != value.shape:
        raise FromOnnxError(f"{what}: the graph holds shape {list(value.shape)}, the model expects {list(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def torch_model_from_artifact(model_dir: str | Path) -> LanguageModel:
    """The ``LanguageModel`` (in eval mode) whose weights are the initializers of ``model_dir``'s
    predict graph; its log-probs match the exported graph to float32 rounding."""
    model_dir = Path(model_dir)
    card = A.read_card(model_dir)
    if card.zoneout:
        raise FromOnnxError(
            f"{model_dir}: zoneout cells (zoneout={card.zoneout}) are exported as Scan loops; "
            f"rebuilding them is not supported (supported: {', '.join(SUPPORTED_CELLS)} without zoneout)"
        )
    if card.cell not in SUPPORTED_CELLS:
        raise FromOnnxError(
            f"{model_dir}: cell {card.cell!r} cannot be rebuilt from ONNX "
            f"(supported: {', '.join(SUPPORTED_CELLS)} without zoneout)"
        )
    # load_external_data resolves weights.bin relative to the graph's directory.
    proto = onnx.load(str(model_dir / card.graphs["predict"]), load_external_data=True)
    graph = proto.graph
    values = _Values(graph)

    # Embedding: the Gather that reads the token ids.
    gathers = [n for n in graph.node if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == A.TOKENS]
    if len(gathers) != 1:
        raise FromOnnxError("expected exactly one Gather of the token ids (the embedding)")
    emb_name = gathers[0].input[0]
    embedding = values.get(emb_name, "embedding")

    op = _RECURRENT_OPS[card.cell]
    rec_nodes = [n for n in graph.node if n.op_type in ("LSTM", "GRU", "RNN", "Scan")]
    if any(n.op_type != op for n in rec_nodes):
        found = sorted({n.op_type for n in rec_nodes})
        raise FromOnnxError(f"cell {card.cell!r} should export as {op} nodes, the graph has {found}")
    if len(rec_nodes) != card.num_layers:
        raise FromOnnxError(f"model.json says {card.num_layers} layers, the graph has {len(rec_nodes)} {op} nodes")

    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    if len(gemms) != 1:
        raise FromOnnxError("expected exactly one Gemm (the decoder) in the predict graph")
    gemm = gemms[0]
    trans_b = next((onnx.helper.get_attribute_value(a) for a in gemm.attribute if a.name == "transB"), 0)
    if trans_b != 1:
        raise FromOnnxError("the decoder Gemm must have transB=1")
    decoder_w = values.get(gemm.input[1], "decoder weight")
    decoder_b = values.get(gemm.input[2], "decoder bias")
    tied = gemm.input[1] == emb_name
    if tied != card.tied:
        raise FromOnnxError(f"model.json says tied={card.tied}, the graph's decoder {'is' if tied else 'is not'} "
                            "the embedding")
    projection = None
    before = values.producer.get(gemm.input[0])
    if before is not None and before.op_type == "MatMul" and before.input[1] in values.arrays:
        projection = values.get(before.input[1], "projection").T  # stored transposed: [H, E] → [E, H]

    cfg = ModelConfig(
        vocab_size=card.vocab_size, cell=card.cell, embedding_size=card.embedding_size,
        hidden_size=card.hidden_size, num_layers=card.num_layers, tied=card.tied, zoneout=0.0,
    )
    model = LanguageModel(cfg)
    _assign(model.embedding.weight, embedding, "embedding")
    if not cfg.tied:
        _assign(model.decoder.weight, decoder_w, "decoder weight")
    _assign(model.decoder.bias, decoder_b, "decoder bias")
    if (projection is None) != (model.projection is None):
        raise FromOnnxError("the graph's projection does not match the model's shape (tied with E != H)")
    if projection is not None:
        _assign(model.projection.weight, projection, "projection")

    rec = model.recurrent
    owner = getattr(rec, "net", rec)  # NativeRecurrent wraps nn.LSTM/GRU/RNN; CustomRecurrent holds its own
    for layer, node in enumerate(rec_nodes):
        _check_attrs(card.cell, node, layer)
        for key, value in _layer_params(card.cell, node, values, layer).items():
            name = f"{key}_l{layer}"
            _assign(getattr(owner, name), value, f"layer {layer} {key}")
    return model.eval()
