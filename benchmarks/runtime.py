"""Sections ``runtime`` and ``roofline``: onnxruntime vs torch eager on the same weights.

The torch model is rebuilt from the artifact's own ONNX initializers
(:func:`training.from_onnx.torch_model_from_artifact`), so both run the very weights the service
serves. Torch runs under ``torch.inference_mode()`` and computes what the predict graph computes:
log-probabilities at the last position only. Both use the same number of intra-op threads.

The roofline compares the achieved GFLOP/s of a batch-64 step (FLOPs of both LSTM layers' gates
and the decoder GEMM; the log-softmax and element-wise work are not counted) with numpy's sgemm
on the model's largest matmul, the decoder ``[64, E] × [E, V]``, measured in the same run; and
the batch-1 step's weight traffic with a measured memory copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import Context, Row, Timing, at_least, log, measure, measure_interleaved
from nextword import artifact as A

GATES = {"rnn": 1, "gru": 3, "cifg": 4, "lstm": 4, "peephole": 4, "highway": 4}  # cifg: ONNX LSTM computes 4 blocks
TARGET_B1, TARGET_B64, TARGET_ROOFLINE = 3.0, 1.5, 0.60


def step_flops(card: A.ModelCard) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one step of one row: recurrent gates of every layer
    (input and recurrent matmuls), the tied model's projection, and the decoder GEMM."""
    H, E, V = card.hidden_size, card.embedding_size, card.vocab_size
    G = GATES.get(card.cell, 4)
    recurrent = 0
    for layer in range(card.num_layers):
        size_in = E if layer == 0 else H
        recurrent += 2 * G * H * (size_in + H)
        if card.cell == "highway":
            recurrent += 2 * H * (size_in + H) + (2 * size_in * H if size_in != H else 0)
    projection = 2 * H * E if card.tied and H != E else 0
    decoder = 2 * (E if card.tied else H) * V
    return {"recurrent": recurrent, "projection": projection, "decoder": decoder,
            "total": recurrent + projection + decoder}


def weight_bytes(card: A.ModelCard) -> int:
    """float32 bytes of the weights one step reads (the embedding row gather is negligible; a tied
    decoder reads the whole embedding matrix)."""
    flops = step_flops(card)
    return 4 * (flops["total"] // 2 + card.vocab_size)  # one float per MAC of a batch-1 step, plus the bias


def ort_session(path: Any, threads: int) -> Any:
    """An onnxruntime session configured like the service's (``service/engine/runtime.py``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def passage_ids(card: A.ModelCard, model_dir: Any, n: int) -> np.ndarray:
    from benchmarks.texts import long_words
    from nextword.text import tokenize
    from nextword.vocab import Vocab

    vocab = Vocab.load(model_dir / card.vocab_file)
    words = tokenize(" ".join(long_words(n * 2)))[:n]
    return np.asarray(vocab.encode(words), dtype=np.int64)


class _Cases:
    """The inputs of the three comparisons, as numpy (onnxruntime) and torch tensors."""

    def __init__(self, card: A.ModelCard, model_dir: Any, seed: int) -> None:
        rng = np.random.default_rng(seed)
        ids = passage_ids(card, model_dir, 64)
        L, H = card.num_layers, card.hidden_size
        eos = 1

        def state(batch: int, zero: bool) -> dict[str, np.ndarray]:
            if zero:
                return {s: np.zeros((L, batch, H), np.float32) for s in card.state_names}
            return {s: (rng.standard_normal((L, batch, H)) * 0.3).astype(np.float32) for s in card.state_names}

        prompt = np.concatenate([[eos], ids[:63]])[None, :]
        self.cases = {
            "step, batch 1": (ids[:1].reshape(1, 1), state(1, False)),
            "step, batch 64": (ids[:64].reshape(64, 1), state(64, False)),
            "64-token prompt, batch 1": (prompt.astype(np.int64), state(1, True)),
        }

    def feeds(self, name: str) -> dict[str, np.ndarray]:
        tokens, state = self.cases[name]
        lengths = np.full(tokens.shape[0], tokens.shape[1], dtype=np.int64)
        return {A.TOKENS: tokens, A.LENGTHS: lengths, **{A.state_input(k): v for k, v in state.items()}}


def run_runtime(ctx: Context) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from training.from_onnx import FromOnnxError, torch_model_from_artifact

    card = ctx.card
    threads = ctx.threads
    torch.set_num_threads(threads)
    sess = ort_session(ctx.model_dir / card.graphs["predict"], threads)
    int8_file = card.graphs.get("predict_int8")
    sess8 = ort_session(ctx.model_dir / int8_file, threads) if int8_file else None
    try:
        model = torch_model_from_artifact(ctx.model_dir)
    except FromOnnxError as exc:
        model = None
        torch_error = str(exc)
    cases = _Cases(card, ctx.model_dir, ctx.seed)
    timing = {"warmup": ctx.pick(5, 2), "repeats": ctx.pick(11, 3), "min_time": ctx.pick(0.2, 0.02)}
    rows: list[Row] = []
    ctx.shared["runtime"] = {}
    bytes_b1 = weight_bytes(card)

    for name in cases.cases:
        feeds = cases.feeds(name)
        tokens_t = torch.from_numpy(feeds[A.TOKENS])
        state_t = tuple(torch.from_numpy(feeds[A.state_input(s)]) for s in card.state_names)

        def run_ort(feeds=feeds) -> Any:
            return sess.run([A.LOG_PROBS], feeds)

        def run_torch(tokens_t=tokens_t, state_t=state_t) -> Any:
            with torch.inference_mode():
                feats, new_state = model.features(tokens_t, state_t)
                return F.log_softmax(model.decoder(feats[:, -1]), dim=-1), new_state

        fns = {"onnxruntime": run_ort}
        if model is not None:
            fns["torch"] = run_torch
        if sess8 is not None:
            fns["int8"] = lambda feeds=feeds: sess8.run([A.LOG_PROBS], feeds)
        log(f"runtime: {name} ({', '.join(fns)})")
        t = measure_interleaved(fns, **timing)
        ort_t = t["onnxruntime"]
        ctx.shared["runtime"][name] = {k: v.median for k, v in t.items()}
        if model is None:
            rows.append(Row("runtime", f"onnxruntime vs torch eager, {name}", None, "×", display="not available",
                            note=torch_error))
        else:
            torch_t = t["torch"]
            delta = float(np.abs(run_torch()[0].numpy() - run_ort()[0]).max())
            target = {"step, batch 1": TARGET_B1, "step, batch 64": TARGET_B64}.get(name)
            ratio = torch_t.median / ort_t.median
            note = ""
            if target is not None and ratio < target:
                note = _runtime_note(name, card, ort_t, torch_t, bytes_b1, memory_bandwidth(ctx))
            rows.append(Row(
                "runtime", f"onnxruntime vs torch eager, {name}", ratio, "×",
                target=f"≥ {target:g}×" if target else None, met=at_least(ratio, target) if target else None,
                display=f"{ratio:.2f}× (torch {torch_t.ms:.2f} ms, onnxruntime {ort_t.ms:.2f} ms)", note=note,
                details={"onnxruntime": ort_t.summary(), "torch": torch_t.summary(), "max_abs_log_prob_diff": delta,
                         "threads": threads},
            ))
        if sess8 is not None:
            t8 = t["int8"]
            ratio8 = ort_t.median / t8.median
            rows.append(Row(
                "runtime", f"onnxruntime int8 vs fp32, {name}", ratio8, "×",
                display=f"{ratio8:.2f}× (fp32 {ort_t.ms:.2f} ms, int8 {t8.ms:.2f} ms)",
                details={"fp32": ort_t.summary(), "int8": t8.summary()},
            ))
    if sess8 is None:
        rows.append(Row("runtime", "onnxruntime int8 vs fp32", None, display="not available",
                        note="model.json has no graphs.predict_int8 (export with --quantize int8)"))
    else:
        rows.append(Row("runtime", "int8 accuracy change (model card)", None, display=_int8_accuracy(card)))
    rows.append(Row("runtime", "threads (torch = onnxruntime intra-op)", threads, display=str(threads),
                    details={"torch_num_threads": torch.get_num_threads(), "onnxruntime_intra_op": threads}))
    return rows


def _runtime_note(name: str, card: A.ModelCard, ort_t: Timing, torch_t: Timing, nbytes: int, copy_gbs: float) -> str:
    if name == "step, batch 1":
        ort_gbs, torch_gbs = nbytes / ort_t.median / 1e9, nbytes / torch_t.median / 1e9
        bound = ("near the memory bound" if ort_gbs >= 0.7 * copy_gbs else "below the memory bound")
        return (f"a batch-1 step reads {nbytes / 1e6:.0f} MB of fp32 weights (GEMV): onnxruntime at {ort_gbs:.1f} "
                f"GB/s, "
                f"torch at {torch_gbs:.1f} GB/s, a numpy memory copy at {copy_gbs:.1f} GB/s; onnxruntime is {bound}, "
                "so the ratio is bounded by how close torch already gets")
    flops = 64 * step_flops(card)["total"]
    return (f"batch 64 is compute-bound GEMM work for both: onnxruntime {flops / ort_t.median / 1e9:.0f} GFLOP/s, "
            f"torch {flops / torch_t.median / 1e9:.0f} GFLOP/s")


def memory_bandwidth(ctx: Context) -> float:
    """GB/s of a numpy copy of a 64 MB array (read + write counted), measured once per run."""
    if "copy_gbs" not in ctx.shared:
        src = np.ones(1 << 24, np.float32)
        dst = np.empty_like(src)
        t = measure(lambda: np.copyto(dst, src), warmup=2, repeats=ctx.pick(7, 3), min_time=ctx.pick(0.1, 0.02))
        ctx.shared["copy_gbs"] = 2 * src.nbytes / t.median / 1e9
    return ctx.shared["copy_gbs"]


def _int8_accuracy(card: A.ModelCard) -> str:
    parts = []
    delta = card.export.get("int8_vs_fp32_max_abs")
    if delta is not None:
        parts.append(f"max |Δ log p| vs fp32 = {delta:.3g} (export check)")

    def find(tree: Any, path: str = "") -> None:
        if isinstance(tree, dict):
            for k, v in tree.items():
                find(v, f"{path}.{k}" if path else str(k))
        elif "int8" in path and isinstance(tree, int | float):
            parts.append(f"{path} = {tree:.4g}")

    find(card.metrics)
    return "; ".join(parts) or "the model card records no int8 accuracy figure"


def run_roofline(ctx: Context) -> list[Row]:
    card = ctx.card
    threads = ctx.threads
    E, V = card.embedding_size if card.tied else card.hidden_size, card.vocab_size
    flops = step_flops(card)
    timing = {"warmup": ctx.pick(5, 2), "repeats": ctx.pick(9, 3), "min_time": ctx.pick(0.15, 0.02)}
    shared = ctx.shared.get("runtime", {})
    sess = None
    if "step, batch 64" not in shared or "step, batch 1" not in shared:
        sess = ort_session(ctx.model_dir / card.graphs["predict"], threads)
        cases = _Cases(card, ctx.model_dir, ctx.seed)
        for name in ("step, batch 1", "step, batch 64"):
            feeds = cases.feeds(name)
            t = measure(lambda feeds=feeds: sess.run([A.LOG_PROBS], feeds), **timing)
            shared.setdefault(name, {})["onnxruntime"] = t.median
    t64, t1 = shared["step, batch 64"]["onnxruntime"], shared["step, batch 1"]["onnxruntime"]

    log("roofline: numpy sgemm on the decoder shape and on the step's GEMM mix")
    rng = np.random.default_rng(ctx.seed)

    def sgemm(m: int, k: int, n: int) -> Timing:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.empty((m, n), np.float32)
        return measure(lambda: np.matmul(a, b, out=c), **timing)

    decoder = sgemm(64, E, V)
    sgemm_gflops = 2 * 64 * E * V / decoder.median / 1e9
    achieved = 64 * flops["total"] / t64 / 1e9
    ratio = achieved / sgemm_gflops
    # the best numpy does on the step's own GEMMs: each layer's [64, in + H] x [in + H, G*H], then the decoder
    G, H = GATES.get(card.cell, 4), card.hidden_size
    mix = decoder.median
    for layer in range(card.num_layers):
        size_in = card.embedding_size if layer == 0 else H
        mix += sgemm(64, size_in + H, G * H).median
    mix_gflops = 64 * (flops["total"] - flops["projection"]) / mix / 1e9
    note = ""
    if ratio < TARGET_ROOFLINE:
        note = (f"{flops['recurrent'] / flops['total']:.0%} of the step's FLOPs are the LSTM gates, GEMMs of "
                f"[64, in+H] × [in+H, {G}H]: numpy itself reaches only {mix_gflops:.0f} GFLOP/s on the step's GEMM mix "
                f"({achieved / mix_gflops:.0%} of that achieved); the log-softmax over [64, V] is uncounted work")
    rows = [Row(
        "roofline", "batch-64 step GFLOP/s vs numpy sgemm [64, E] × [E, V]", ratio * 100, "%",
        target=f"≥ {TARGET_ROOFLINE:.0%}", met=at_least(ratio, TARGET_ROOFLINE),
        display=f"{ratio:.0%} ({achieved:.0f} of {sgemm_gflops:.0f} GFLOP/s)", note=note,
        details={"step_flops_per_row": flops, "step_batch64_ms": t64 * 1e3, "achieved_gflops": achieved,
                 "sgemm": {"shape": [64, E, V], **decoder.summary(), "gflops": sgemm_gflops},
                 "numpy_step_gemm_mix_gflops": mix_gflops, "threads": threads},
    )]

    # batch 1 is bound by memory traffic, not FLOPs: compare with a measured copy bandwidth
    nbytes = weight_bytes(card)
    copy_gbs = memory_bandwidth(ctx)
    step_gbs = nbytes / t1 / 1e9
    rows.append(Row(
        "roofline", "batch-1 step weight traffic vs numpy memory copy", step_gbs / copy_gbs * 100, "%",
        display=f"{step_gbs / copy_gbs:.0%} ({step_gbs:.1f} of {copy_gbs:.1f} GB/s; {nbytes / 1e6:.0f} MB fp32 "
                f"weights per step, {t1 * 1e3:.2f} ms)",
        note="above the copy bandwidth: part of the weights stays in the CPU caches between steps"
        if step_gbs > copy_gbs else "",
        details={"weight_bytes": nbytes, "step_batch1_ms": t1 * 1e3, "copy_gbs": copy_gbs},
    ))
    return rows
