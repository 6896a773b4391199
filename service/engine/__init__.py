"""The inference engine (no HTTP): onnxruntime runtime, dynamic batcher, model repository, predictor.

Public API for features built on top (sessions, generation)::

    engine.repository.resolve(name, version) -> LoadedVersion          # card, vocab, index, batcher
    await lv.batcher.run(WorkItem(tokens, state=..., want_state=True)) -> WorkResult
    select(lv, row, k, prefix, writing, options, exclude) -> (candidates, Selection)
        # row: result.log_probs or predictor.adapt_row(...) (the cache LM mixed in, new words);
        # top-k + prefix completion, blocklist, corrections, written forms (service.engine.suggest)
"""

from service.engine.batcher import PREDICT, SCORE, STEP, Batcher, WorkItem, WorkResult
from service.engine.core import Engine
from service.engine.predictor import Prediction, Predictor, PredictQuery, ScoreResult, encode_context
from service.engine.repository import LoadedVersion, ModelRepository
from service.engine.runtime import DeviceChoice, ModelRuntime, choose_device
from service.engine.suggest import Candidate, SuggestOptions, Writing, select
from service.engine.vocab_index import TopK, VocabIndex

__all__ = [
    "PREDICT", "SCORE", "STEP", "Batcher", "Candidate", "DeviceChoice", "Engine", "LoadedVersion", "ModelRepository",
    "ModelRuntime", "Prediction", "PredictQuery", "Predictor", "ScoreResult", "SuggestOptions", "TopK", "VocabIndex",
    "WorkItem", "WorkResult", "Writing", "choose_device", "encode_context", "select",
]
