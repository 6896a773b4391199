"""``POST /v1/predict``, ``/v1/predict/batch`` and ``/v1/score``."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.body import CheckedRoute
from service.api.deps import PredictorDep, SettingsDep
from service.api.limits import check_batch_items
from service.api.protocol.native import (
    BatchPredictRequest,
    BatchPredictResponse,
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    ScoreRequest,
    ScoreResponse,
    WordProbability,
    WordScore,
)
from service.engine import Candidate, Prediction, PredictQuery, SuggestOptions

router = APIRouter(prefix="/v1", tags=["prediction"], route_class=CheckedRoute)

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Malformed JSON or non-UTF-8 body"},
    404: {"model": ErrorResponse, "description": "Unknown model or version"},
    413: {"model": ErrorResponse, "description": "Text or body over the limit"},
    422: {"model": ErrorResponse, "description": "Invalid field"},
    503: {"model": ErrorResponse, "description": "Queue full or no model loaded (see Retry-After)"},
    504: {"model": ErrorResponse, "description": "Deadline exceeded while queued"},
}


def serialized(body: PredictResponse | BatchPredictResponse) -> Response:
    """The body as JSON, skipping FastAPI's second validation of an object that is already a
    validated response model (a measurable share of a prediction's CPU time under load)."""
    return Response(body.model_dump_json(), media_type="application/json")


def to_response(p: Prediction) -> PredictResponse:
    return PredictResponse(
        model=p.model, version=p.version, prefix=p.prefix, prefix_probability=p.prefix_probability,
        matches=p.matches, context_words=p.context_words, truncated=p.truncated,
        predictions=[word_probability(c) for c in p.candidates],
    )


def word_probability(c: Candidate) -> WordProbability:
    return WordProbability(word=c.word, display=c.display, probability=c.probability, log_prob=c.log_prob,
                           correction=c.correction)


def options_of(body: PredictRequest) -> SuggestOptions:
    return SuggestOptions(filter=body.filter, corrections=body.corrections)


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS)
async def predict(body: PredictRequest, predictor: PredictorDep) -> Response:
    """The k most likely next words (or completions of the word being typed)."""
    return serialized(to_response(await predictor.predict(body.text, body.k, body.model, body.version, body.learn,
                                                          options_of(body))))


@router.post("/predict/batch", response_model=BatchPredictResponse, responses=_ERRORS)
async def predict_batch(body: BatchPredictRequest, predictor: PredictorDep, settings: SettingsDep) -> Response:
    """Many predictions in one call; items for the same model version share onnxruntime batches."""
    check_batch_items(len(body.items), settings, "items", "items")
    queries = [PredictQuery(i.text, i.k, i.model, i.version, i.learn, options_of(i)) for i in body.items]
    return serialized(BatchPredictResponse(results=[to_response(p) for p in await predictor.predict_many(queries)]))


@router.post("/score", response_model=ScoreResponse, responses=_ERRORS)
async def score(body: ScoreRequest, predictor: PredictorDep) -> ScoreResponse:
    """Per-word log-probabilities and perplexity of a text."""
    result = await predictor.score(body.text, body.model, body.version)
    return ScoreResponse(
        model=result.model, version=result.version, num_words=len(result.words),
        total_log_prob=result.total_log_prob, perplexity=result.perplexity,
        words=[WordScore(word=w.word, log_prob=w.log_prob, rank=w.rank, oov=w.oov) for w in result.words],
    )
