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


def _session(model_dir: Path, graph: str, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_dir / graph), opts, providers=["CPUExecutionProvider"])


def score_stream(
    model_dir: str | Path, words: list[str], window: int = 256, threads: int | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability and rank of every token after the first of ``words`` read as one stream
    (batch 1, state carried): arrays of ``len(words) - 1``, position i scoring ``words[i + 1]``."""
    model_dir = Path(model_dir)
    card, vocab = load_artifact(model_dir)
    sess = _session(model_dir, card.graphs["score"], threads)
    ids = np.asarray(vocab.encode(words), dtype=np.int64)
    state = {A.state_input(s): np.zeros((card.num_layers, 1, card.hidden_size), np.float32) for s in card.state_names}
    outputs = [A.TARGET_LOG_PROBS, A.TARGET_RANKS] + [A.state_output(s) for s in card.state_names]
    lps, ranks = [], []
    for start in tqdm(range(0, len(ids) - 1, window), desc="eval", disable=not progress, leave=False):
        x = ids[start : start + window]
        y = ids[start + 1 : start + 1 + window]
        x = x[: len(y)]
        lp, rank, *new = sess.run(
            outputs, {A.TOKENS: x[None], A.LENGTHS: np.array([len(x)]), A.TARGETS: y[None], **state}
        )
        lps.append(lp[0])
        ranks.append(rank[0])
        state = {A.state_input(s): v for s, v in zip(card.state_names, new, strict=True)}
    if not lps:
        return np.empty(0, np.float32), np.empty(0, np.int64)
    return np.concatenate(lps), np.concatenate(ranks)


def evaluate_artifact(
    model_dir: str | Path, words: list[str], window: int = 256, threads: int | None = None, progress: bool = True
) -> dict[str, float]:
    """Perplexity and top-k accuracy of ``words`` read as one stream (batch 1, state carried),
    scoring every token after the first."""
    lp, ranks = score_stream(model_dir, words, window, threads, progress)
    metrics = StreamMetrics()
    metrics.add(lp, ranks)
    return metrics.result()


def evaluate_predict_graph(
    model_dir: str | Path, graph: str, words: list[str], positions: int = 2048, window: int = 32, batch: int = 64
) -> dict[str, float]:
    """Metrics of a *predict* graph (e.g. the int8 one, which has no score graph) on the first
    ``positions`` positions of ``words``: each position reads the ``window`` words before it from
    the zero state, in batches of right-padded rows. Compare graphs with the same arguments."""
    model_dir = Path(model_dir)
    card, vocab = load_artifact(model_dir)
    sess = ort.InferenceSession(str(model_dir / graph), providers=["CPUExecutionProvider"])
    ids = np.asarray(vocab.encode(words[: positions + 1]), dtype=np.int64)
    metrics = StreamMetrics()
    targets = range(1, len(ids))
    for start in range(0, len(targets), batch):
        rows = list(targets[start : start + batch])
        tokens = np.zeros((len(rows), window), np.int64)
        lengths = np.zeros(len(rows), np.int64)
        for r, t in enumerate(rows):
            context = ids[max(0, t - window) : t]
            tokens[r, : len(context)] = context
            lengths[r] = len(context)
        feeds = {A.TOKENS: tokens, A.LENGTHS: lengths}
        feeds.update(
            {
                A.state_input(s): np.zeros((card.num_layers, len(rows), card.hidden_size), np.float32)
                for s in card.state_names
            }
        )
        log_probs = sess.run([A.LOG_PROBS], feeds)[0]
        gold = ids[rows]
        target_lp = log_probs[np.arange(len(rows)), gold]
        metrics.add(target_lp, (log_probs > target_lp[:, None]).sum(-1))
    return metrics.result()
