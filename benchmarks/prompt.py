"""Section ``prompt``: what a longer prompt costs a stateless ``POST /v1/predict``.

Single client, sequential requests on a keep-alive connection, interleaved across the prompt
lengths (1, 64, 512 words of the fixed passage). The marginal cost per prompt word,
``(latency(512) − latency(1)) / (words(512) − words(1))``, is compared with what
vocabulary-sized output at every position would cost: the score graph (log-softmax over the
vocabulary at each position) minus the predict graph (only the last position), both run
in-process on the same 512 tokens. The predict path must stay well below that.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from benchmarks.common import Context, Row, log, measure_interleaved
from benchmarks.texts import long_text

LENGTHS = (1, 64, 512)


def run_prompt(ctx: Context) -> list[Row]:
    import httpx

    from benchmarks.runtime import ort_session
    from nextword import artifact as A
    from nextword.text import tokenize
    from nextword.vocab import Vocab

    card = ctx.card
    service = ctx.servers.service("default")
    repeats = ctx.pick(25, 5)
    latencies: dict[int, list[float]] = {n: [] for n in LENGTHS}
    words_read: dict[int, int] = {}
    log("prompt: /v1/predict at 1, 64, 512 words")
    with httpx.Client(base_url=service.url, timeout=30) as client:
        bodies = {n: json.dumps({"text": long_text(n), "k": 5, "model": card.name, "version": card.version}).encode()
                  for n in LENGTHS}
        headers = {"content-type": "application/json"}
        for n in LENGTHS:  # warm-up, and the number of words the model reads
            for _ in range(3):
                response = client.post("/v1/predict", content=bodies[n], headers=headers)
                response.raise_for_status()
            words_read[n] = response.json()["context_words"]
        for _ in range(repeats):
            for n in LENGTHS:
                start = time.perf_counter()
                client.post("/v1/predict", content=bodies[n], headers=headers).raise_for_status()
                latencies[n].append(time.perf_counter() - start)
    med = {n: statistics.median(v) * 1e3 for n, v in latencies.items()}
    per_word = (med[512] - med[1]) / max(words_read[512] - words_read[1], 1)

    # the same 512-word prompt in-process: predict (last position) vs score (every position)
    vocab = Vocab.load(ctx.model_dir / card.vocab_file)
    ids = np.asarray([vocab.eos_id, *vocab.encode(tokenize(long_text(512)))], dtype=np.int64)[None, :]
    n = ids.shape[1]
    state = {A.state_input(s): np.zeros((card.num_layers, 1, card.hidden_size), np.float32) for s in card.state_names}
    base = {A.TOKENS: ids, A.LENGTHS: np.array([n], np.int64), **state}
    predict = ort_session(ctx.model_dir / card.graphs["predict"], ctx.threads)
    score = ort_session(ctx.model_dir / card.graphs["score"], ctx.threads)
    score_feeds = {**base, A.TARGETS: np.roll(ids, -1, axis=1)}
    t = measure_interleaved({"predict": lambda: predict.run([A.LOG_PROBS], base),
                             "score": lambda: score.run([A.TARGET_LOG_PROBS], score_feeds)},
                            warmup=2, repeats=ctx.pick(5, 2), min_time=0.0)
    vocab_per_pos = (t["score"].median - t["predict"].median) / n * 1e3
    raw_per_word = t["predict"].median / n * 1e3

    rows = [Row("prompt", f"POST /v1/predict, {m}-word prompt", med[m], "ms",
                display=f"{med[m]:.2f} ms ({words_read[m]} words read)",
                details={"median_ms": med[m], "words_read": words_read[m], "requests": repeats})
            for m in LENGTHS]
    ok = per_word < vocab_per_pos
    rows.append(Row(
        "prompt", "marginal cost per prompt word (512 vs 1 word)", per_word, "ms/word",
        target="< V-sized output per position", met=ok,
        display=f"{per_word * 1e3:.1f} µs/word (raw predict graph {raw_per_word * 1e3:.1f} µs/word; "
                f"V-sized output per position would add {vocab_per_pos * 1e3:.0f} µs/word)",
        note="" if ok else "the predict path costs as much per word as a vocabulary-sized output per position",
        details={"http_ms_per_word": per_word, "raw_predict_ms_per_word": raw_per_word,
                 "vocab_output_ms_per_position": vocab_per_pos, "predict_512_ms": t["predict"].ms,
                 "score_512_ms": t["score"].ms},
    ))
    return rows
