"""Builds the ONNX graphs of a trained :class:`~training.model.LanguageModel` by hand.

Why by hand: the torch exporters fix the time dimension for some recurrent modules and have
mis-set GRU's ``linear_before_reset``; writing the graph from the weights gives dynamic batch
and time for every cell and uses the native ``LSTM`` (with ``P`` peepholes and
``input_forget`` for CIFG), ``GRU`` and ``RNN`` operators where a cell maps onto them. Zoneout
cells (their inference-time expectation is not a native op) run as one ``Scan`` per layer.

Two graphs share one builder: ``predict`` emits log-probabilities only at each row's last valid
position (a T-word prompt never forms T vocabulary-sized outputs), ``score`` emits the target
log-probability and rank at every position.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from nextword import artifact as A
from training.model import CustomRecurrent, HighwayLSTM, LanguageModel, NativeRecurrent

OPSET = 17
_FLOAT = TensorProto.FLOAT


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _lstm_onnx_order(w: np.ndarray, gates: str) -> np.ndarray:
    """PyTorch stacks gates as (i, f, g, o) — or (i, g, o) for CIFG; ONNX wants (i, o, f, c)."""
    parts = dict(zip(gates, np.split(w, len(gates)), strict=True))
    if "f" not in parts:
        parts["f"] = np.zeros_like(parts["i"])  # unused: input_forget makes f = 1 - i
    return np.concatenate([parts["i"], parts["o"], parts["f"], parts["g"]])


def _gru_onnx_order(w: np.ndarray) -> np.ndarray:
    r, z, n = np.split(w, 3)
    return np.concatenate([z, r, n])


class _Builder:
    """Accumulates nodes and initializers; ``weights_dtype`` float16 stores weights at half size
    and casts them back to float32 once (onnxruntime folds the cast at load)."""

    def __init__(self, weights_dtype: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.half = weights_dtype == "float16"
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def weight(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        if self.half and value.size > 64:
            self.inits.append(numpy_helper.from_array(value.astype(np.float16), name + "_f16"))
            self.node("Cast", [name + "_f16"], [name], to=_FLOAT)
        else:
            self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> list[str]:
        outputs = outputs or [self.name(op.lower())]
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs

    def op(self, op: str, *inputs: str, **attrs) -> str:
        return self.node(op, list(inputs), **attrs)[0]


def _scan_layer(
    b: _Builder,
    cell: str,
    zoneout: float,
    hidden: int,
    xw: str,
    mask: str,
    h0: str,
    c0: str | None,
    r_t: str,
    b_hh: str,
    peep: np.ndarray | None,
) -> tuple[str, str, str | None]:
    """One zoneout layer as a Scan over time: inputs ``xw`` [T,B,G*H] (W x + b already applied) and
    ``mask`` [T,B,1]; returns (Y [T,B,H], h_T, c_T). Masked steps keep the previous state."""
    p = float(zoneout)
    body_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def n(op: str, inputs: list[str], out: str, **attrs) -> str:
        body_nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def c(name: str, value: float | np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def sizes(name: str, count: int) -> str:
        inits.append(numpy_helper.from_array(np.array([hidden] * count, dtype=np.int64), name))
        return name

    one, pz, qz = c("one", 1.0), c("p", p), c("q", 1.0 - p)
    lstm_family = c0 is not None
    state_in = ["h_prev"] + (["c_prev"] if lstm_family else [])
    hw = n("Add", [n("MatMul", ["h_prev", r_t], "hw0"), b_hh], "hw")
    if cell == "gru":
        xr, xz, xn = "xr", "xz", "xn"
        split = sizes("split3", 3)
        body_nodes.append(helper.make_node("Split", ["xw_t", split], [xr, xz, xn], axis=1))
        body_nodes.append(helper.make_node("Split", ["hw", split], ["hr", "hz", "hn"], axis=1))
        r = n("Sigmoid", [n("Add", [xr, "hr"], "r0")], "r")
        z = n("Sigmoid", [n("Add", [xz, "hz"], "z0")], "z")
        nn_ = n("Tanh", [n("Add", [xn, n("Mul", [r, "hn"], "rhn")], "n0")], "n")
        h_new = n("Add", [n("Mul", [n("Sub", [one, z], "omz"), nn_], "a"), n("Mul", [z, "h_prev"], "b")], "h_new")
        new = {"h": h_new}
    else:
        gates = n("Add", ["xw_t", hw], "gates")
        names = ["gi", "gg", "go"] if cell == "cifg" else ["gi", "gf", "gg", "go"]
        split = sizes("split", len(names))
        body_nodes.append(helper.make_node("Split", [gates, split], names, axis=1))
        gi, gg, go = "gi", "gg", "go"
        gf = "gf" if cell != "cifg" else None
        if cell == "peephole":
            pi, pf, po = (c(f"peep_{k}", peep[j]) for j, k in enumerate("ifo"))
            gi = n("Add", [gi, n("Mul", [pi, "c_prev"], "pic")], "gi_p")
            gf = n("Add", [gf, n("Mul", [pf, "c_prev"], "pfc")], "gf_p")
        i = n("Sigmoid", [gi], "i")
        f = n("Sub", [one, i], "f") if cell == "cifg" else n("Sigmoid", [gf], "f")
        c_new = n("Add", [n("Mul", [f, "c_prev"], "fc"), n("Mul", [i, n("Tanh", [gg], "g")], "ig")], "c_new")
        if cell == "peephole":
            go = n("Add", [go, n("Mul", [po, c_new], "poc")], "go_p")
        h_new = n("Mul", [n("Sigmoid", [go], "o"), n("Tanh", [c_new], "tc")], "h_new")
        new = {"h": h_new, "c": c_new}

    outs = []
    for key in ["h"] + (["c"] if lstm_family else []):
        prev = f"{key}_prev"
        zoned = n("Add", [n("Mul", [pz, prev], f"{key}_keep"), n("Mul", [qz, new[key]], f"{key}_take")], f"{key}_z")
        # masked (padding) steps leave the state untouched
        kept = n(
            "Add",
            [n("Mul", ["m_t", zoned], f"{key}_m1"), n("Mul", [n("Sub", [one, "m_t"], f"{key}_nm"), prev], f"{key}_m0")],
            f"{key}_out",
        )
        outs.append(kept)
    body_nodes.append(helper.make_node("Identity", [outs[0]], ["y_t"]))
    vi = lambda name, shape: helper.make_tensor_value_info(name, _FLOAT, shape)  # noqa: E731
    body = helper.make_graph(
        body_nodes,
        "step",
        [vi(s, ["B", hidden]) for s in state_in] + [vi("xw_t", ["B", None]), vi("m_t", ["B", 1])],
        [vi(o, ["B", hidden]) for o in outs] + [vi("y_t", ["B", hidden])],
        initializer=inits,
    )
    init_states = [h0] + ([c0] if lstm_family else [])
    outputs = [b.name("h_T")] + ([b.name("c_T")] if lstm_family else []) + [b.name("Y")]
    b.node("Scan", init_states + [xw, mask], outputs, body=body, num_scan_inputs=2)
    return outputs[-1], outputs[0], outputs[1] if lstm_family else None


def _layer_weights(model: LanguageModel, layer: int) -> dict[str, np.ndarray]:
    rec = model.recurrent
    if isinstance(rec, NativeRecurrent):
        mod, suffix = rec.net, f"_l{layer}"
    elif isinstance(rec, HighwayLSTM):
        mod, suffix = rec.layers[layer], "_l0"
    else:
        mod, suffix = rec, f"_l{layer}"
    out = {k: _np(getattr(mod, f"{k}{suffix}")) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    if isinstance(rec, CustomRecurrent) and model.cfg.cell == "peephole":
        out["peephole"] = _np(getattr(rec, f"peephole_l{layer}"))
    return out


def build_graph(model: LanguageModel, kind: str, weights_dtype: str = "float32") -> onnx.ModelProto:
    """The ``predict`` or ``score`` graph of ``model`` (see ``models/README.md`` for the contract)."""
    cfg = model.cfg
    H, L = cfg.hidden_size, cfg.num_layers
    b = _Builder(weights_dtype)
    cell = cfg.cell
    vi = helper.make_tensor_value_info
    inputs = [vi(A.TOKENS, TensorProto.INT64, ["batch", "time"]), vi(A.LENGTHS, TensorProto.INT64, ["batch"])]
    inputs += [vi(A.state_input(s), _FLOAT, [L, "batch", H]) for s in cfg.state_names]
    if kind == "score":
        inputs.append(vi(A.TARGETS, TensorProto.INT64, ["batch", "time"]))

    emb = b.weight("embedding", _np(model.embedding.weight))
    x = b.op("Transpose", b.op("Gather", emb, A.TOKENS), perm=[1, 0, 2])  # [T, B, E]
    seq_lens = b.op("Cast", A.LENGTHS, to=TensorProto.INT32)
    ax0, ax1 = b.const("ax0", np.array([0], np.int64)), b.const("ax1", np.array([1], np.int64))
    # mask[t, b] = t < length[b]  (for Scan layers and the score graph)
    time_len = b.op("Gather", b.op("Shape", A.TOKENS), b.const("one_idx", np.array(1, np.int64)))
    steps = b.op("Range", b.const("zero", np.array(0, np.int64)), time_len, b.const("step", np.array(1, np.int64)))
    mask_tb = b.op("Less", b.op("Unsqueeze", steps, ax1), b.op("Unsqueeze", A.LENGTHS, ax0))  # [T, B]

    final: dict[str, list[str]] = {s: [] for s in cfg.state_names}
    for layer in range(L):
        w = _layer_weights(model, layer)
        lo, hi = np.array([layer], np.int64), np.array([layer + 1], np.int64)
        init = {s: b.op("Slice", A.state_input(s), b.const("lo", lo), b.const("hi", hi), ax0) for s in cfg.state_names}
        if cfg.zoneout:
            xw = b.op("Add", b.op("MatMul", x, b.weight("w_ih_t", w["weight_ih"].T)), b.weight("b_ih", w["bias_ih"]))
            mask = b.op("Unsqueeze", b.op("Cast", mask_tb, to=_FLOAT), b.const("ax2", np.array([2], np.int64)))
            h0 = b.op("Squeeze", init["h"], ax0)
            c0 = b.op("Squeeze", init["c"], ax0) if "c" in init else None
            y, h_t, c_t = _scan_layer(
                b,
                cell,
                cfg.zoneout,
                H,
                xw,
                mask,
                h0,
                c0,
                b.weight("w_hh_t", w["weight_hh"].T),
                b.weight("b_hh", w["bias_hh"]),
                w.get("peephole"),
            )
            final["h"].append(b.op("Unsqueeze", h_t, ax0))
            if c_t is not None:
                final["c"].append(b.op("Unsqueeze", c_t, ax0))
            layer_out = y
        else:
            if cell == "gru":
                W, R = _gru_onnx_order(w["weight_ih"]), _gru_onnx_order(w["weight_hh"])
                B_ = np.concatenate([_gru_onnx_order(w["bias_ih"]), _gru_onnx_order(w["bias_hh"])])
                op, extra, attrs = "GRU", [], {"linear_before_reset": 1}
            elif cell == "rnn":
                W, R, B_ = w["weight_ih"], w["weight_hh"], np.concatenate([w["bias_ih"], w["bias_hh"]])
                op, extra, attrs = "RNN", [], {"activations": ["Tanh"]}
            else:
                gates = "igo" if cell == "cifg" else "ifgo"
                W, R = _lstm_onnx_order(w["weight_ih"], gates), _lstm_onnx_order(w["weight_hh"], gates)
                B_ = np.concatenate([_lstm_onnx_order(w["bias_ih"], gates), _lstm_onnx_order(w["bias_hh"], gates)])
                op, attrs = "LSTM", {"input_forget": 1} if cell == "cifg" else {}
                extra = [init["c"]]
                if cell == "peephole":
                    p_i, p_f, p_o = w["peephole"]
                    extra.append(b.weight("P", np.concatenate([p_i, p_o, p_f])[None]))
            ins = [
                x,
                b.weight("W", W[None]),
                b.weight("R", R[None]),
                b.weight("B", B_[None]),
                seq_lens,
                init["h"],
                *extra,
            ]
            outs = [b.name("Y"), b.name("Y_h")] + ([b.name("Y_c")] if op == "LSTM" else [])
            b.node(op, ins, outs, hidden_size=H, **attrs)
            layer_out = b.op("Squeeze", outs[0], ax1)  # [T, B, H]
            final["h"].append(outs[1])
            if op == "LSTM":
                final["c"].append(outs[2])
        if isinstance(model.recurrent, HighwayLSTM):
            gate = model.recurrent.gates[layer]
            t = b.op(
                "Sigmoid",
                b.op(
                    "Add",
                    b.op("MatMul", b.op("Concat", x, layer_out, axis=2), b.weight("hw_t", _np(gate.weight).T)),
                    b.weight("hw_b", _np(gate.bias)),
                ),
            )
            carry = model.recurrent.carry[layer]
            carried = (
                x if isinstance(carry, torch.nn.Identity) else b.op("MatMul", x, b.weight("carry", _np(carry.weight).T))
            )
            one = b.const("one", np.array(1.0, np.float32))
            layer_out = b.op("Add", b.op("Mul", t, layer_out), b.op("Mul", b.op("Sub", one, t), carried))
        x = layer_out

    for s in cfg.state_names:
        b.node("Concat", final[s], [A.state_output(s)], axis=0)
    feats = b.op("Transpose", x, perm=[1, 0, 2])  # [B, T, H]
    if kind == "predict":
        last = b.op("Unsqueeze", b.op("Sub", A.LENGTHS, b.const("one_i", np.array(1, np.int64))), ax1)  # [B, 1]
        feats = b.op("GatherND", feats, last, batch_dims=1)  # [B, H]: only the last valid position
    if model.projection is not None:
        feats = b.op("MatMul", feats, b.weight("proj", _np(model.projection.weight).T))
    dec_w = emb if cfg.tied else b.weight("decoder", _np(model.decoder.weight))
    dec_b = b.weight("decoder_bias", _np(model.decoder.bias))
    outputs = [vi(A.state_output(s), _FLOAT, [L, "batch", H]) for s in cfg.state_names]
    if kind == "predict":
        logits = b.node("Gemm", [feats, dec_w, dec_b], transB=1)[0]
        b.node("LogSoftmax", [logits], [A.LOG_PROBS], axis=-1)
        outputs.insert(0, vi(A.LOG_PROBS, _FLOAT, ["batch", cfg.vocab_size]))
    else:
        logits = b.op("Add", b.op("MatMul", feats, b.op("Transpose", dec_w, perm=[1, 0])), dec_b)
        logp = b.op("LogSoftmax", logits, axis=-1)  # [B, T, V]
        tgt = b.op("Unsqueeze", A.TARGETS, b.const("ax2", np.array([2], np.int64)))
        tlp = b.op("GatherElements", logp, tgt, axis=2)  # [B, T, 1]
        rank = b.op(
            "ReduceSum",
            b.op("Cast", b.op("Greater", logp, tlp), to=TensorProto.INT64),
            b.const("ax2", np.array([2], np.int64)),
            keepdims=0,
        )
        valid = b.op("Transpose", mask_tb, perm=[1, 0])  # [B, T]
        zero_f, zero_i = b.const("zf", np.array(0.0, np.float32)), b.const("zi", np.array(0, np.int64))
        b.node(
            "Where",
            [valid, b.op("Squeeze", tlp, b.const("ax2", np.array([2], np.int64))), zero_f],
            [A.TARGET_LOG_PROBS],
        )
        b.node("Where", [valid, rank, zero_i], [A.TARGET_RANKS])
        outputs = [
            vi(A.TARGET_LOG_PROBS, _FLOAT, ["batch", "time"]),
            vi(A.TARGET_RANKS, TensorProto.INT64, ["batch", "time"]),
        ] + outputs

    graph = helper.make_graph(b.nodes, f"nextword_{kind}", inputs, outputs, initializer=b.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nextword")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto
