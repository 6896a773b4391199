"""Evaluate an exported model version with onnxruntime on a corpus split, through the same
metrics code as every other model (``training.metrics.StreamMetrics``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from nextword import artifact as A
from nextword.vocab import Vocab
from training.metrics import StreamMetrics


def load_artifact(model_dir: str | Path) -> tuple[A.ModelCard, Vocab]:
    model_dir = Path(model_dir)
    card = A.read_card(model_dir)
    A.verify_files(model_dir, card)
    return card, Vocab.load(model_dir / card.vocab_file)


def evaluate_artifact(
    model_dir: str | Path, words: list[str], window: int = 256, threads: int | None = None, progress: bool = True
) -> dict[str, float]:
    """Perplexity and top-k accuracy of ``words`` read as one stream (batch 1, state carried),
    scoring every token after the first."""
    model_dir = Path(model_dir)
    card, vocab = load_artifact(model_dir)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_dir / card.graphs["score"]), opts, providers=["CPUExecutionProvider"])
    ids = np.asarray(vocab.encode(words), dtype=np.int64)
    state = {A.state_input(s): np.zeros((card.num_layers, 1, card.hidden_size), np.float32) for s in card.state_names}
    outputs = [A.TARGET_LOG_PROBS, A.TARGET_RANKS] + [A.state_output(s) for s in card.state_names]
    metrics = StreamMetrics()
    for start in tqdm(range(0, len(ids) - 1, window), desc="eval", disable=not progress, leave=False):
        x = ids[start : start + window]
        y = ids[start + 1 : start + 1 + window]
        x = x[: len(y)]
        lp, ranks, *new = sess.run(
            outputs, {A.TOKENS: x[None], A.LENGTHS: np.array([len(x)]), A.TARGETS: y[None], **state}
        )
        metrics.add(lp[0], ranks[0])
        state = {A.state_input(s): v for s, v in zip(card.state_names, new, strict=True)}
    return metrics.result()
