"""Every request and response body of the HTTP API (they are also the OpenAPI schema at ``/docs``).

Limits that depend on configuration (text length, batch size) are checked by the handlers, not
here, so a deployment can change them without a code change; fixed bounds (``k``) live here.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.engine.repository import SERVING, VersionInfo

MAX_K = 100


def integral(value: Any) -> Any:
    """``value`` as an int when it is a float without a fractional part, else unchanged. JSON
    Schema's "integer" is any such number, so 5.0 is the integer 5 (a JavaScript client may well
    send it); strict validation would refuse it. ``true`` stays refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The integer types of request bodies: strict (not a bool, not a string), integral floats accepted.
# (The optional one converts outside the union, so that Field's bounds still reach the integer.)
Int = Annotated[int, BeforeValidator(integral)]
OptInt = Annotated[int | None, BeforeValidator(integral)]


def _model_field() -> Any:
    return Field(None, description="Model name; default: NEXTWORD_DEFAULT_MODEL or the first model alphabetically.")


def _version_field() -> Any:
    return Field(None, ge=1, description="Model version; default: the newest loaded version of the model.")


FILTER_DESCRIPTION = ("Leave out blocklisted (offensive) words (the service's NEXTWORD_BLOCKLIST); false offers "
                      "every word.")
CORRECTIONS_DESCRIPTION = ("When the word being typed has few or unlikely completions, also offer corrections of "
                           "a one-key typo in it (marked correction=true). Off service-wide with "
                           "NEXTWORD_CORRECTIONS=false.")


class _Strict(BaseModel):
    # Unknown fields are an error: a typo like "tetx" should not silently predict from "".
    # Strict types: JSON's true is not the version 1, nor 0 a false "stream" (pydantic's lax mode
    # took both); a float field still takes an integer.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)


# --- errors ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable kind, e.g. validation_error, model_not_found, queue_full.")
    message: str
    field: str | None = Field(None, description="Dotted path of the offending request field, when there is one.")
    details: list[dict[str, Any]] | None = Field(None, description="Every validation problem, when there are several.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- prediction -----------------------------------------------------------------------------------


LEARN_DESCRIPTION = (
    "Adapt to the writer: the text's own recent words weigh more (the model's fitted cache language model) and "
    "words outside the vocabulary typed at least NEXTWORD_NEW_WORD_MIN_COUNT times (once, with "
    "NEXTWORD_NEW_WORD_FIRST_USE, when no single typing error turns a known word into them) are offered, spelled "
    "as typed. "
    "false: predictions as for a stranger, and nothing is learned (incognito)."
)


class PredictRequest(_Strict):
    text: str = Field(
        description="Text typed so far. Ending inside a word makes that fragment a prefix to complete; "
        "ending in whitespace (or empty) predicts the next whole word.",
        examples=["The quick brown fox jumps over the la"],
    )
    k: Int = Field(5, ge=1, le=MAX_K, description="How many words to return.")
    model: str | None = _model_field()
    version: OptInt = _version_field()
    learn: bool = Field(True, description=LEARN_DESCRIPTION)
    filter: bool = Field(True, description=FILTER_DESCRIPTION)
    corrections: bool = Field(True, description=CORRECTIONS_DESCRIPTION)


class WordProbability(BaseModel):
    word: str = Field(description="The model word (lowercase), as the model and /v1/score know it.")
    display: str = Field(description="The word as a writer would type it here: its usual form in the training "
                         "corpus (\"I\", \"John\"), capitalised at a sentence start, following the typed "
                         "fragment's case (all capitals after two or more capitals). Equal to word for a model "
                         "without casing statistics, except a new word (one outside the vocabulary that this "
                         "text or session taught): that is written as the writer last wrote it (\"Ierulli\").")
    probability: float = Field(description="Probability (renormalised over prefix matches when a prefix is used; "
                               "over the matches and the corrections when a correction is offered).")
    log_prob: float = Field(description="Natural log of probability.")
    correction: bool = Field(False, description="True: offered as a correction of a typo in the typed fragment "
                             "(it does not start with the prefix).")


class PredictResponse(BaseModel):
    model: str
    version: int
    predictions: list[WordProbability] = Field(description="Most likely first; <unk>/<eos> never appear.")
    prefix: str = Field(description="The word fragment completed (lowercased), or '' for a whole next word.")
    prefix_probability: float = Field(
        description="Model probability that the next word is any offered-able word matching the prefix "
        "(without a prefix: of any word but <unk>/<eos>)."
    )
    matches: int = Field(description="Vocabulary words eligible under the prefix.")
    context_words: int = Field(description="Words of context the model read (after the context budget).")
    truncated: bool = Field(description="True when the text had more words than NEXTWORD_CONTEXT_WORDS and only "
                            "the last ones were read.")


class BatchPredictRequest(_Strict):
    items: list[PredictRequest] = Field(min_length=1, description="At most NEXTWORD_MAX_BATCH_ITEMS items.")


class BatchPredictResponse(BaseModel):
    results: list[PredictResponse]


# --- scoring --------------------------------------------------------------------------------------


class ScoreRequest(_Strict):
    text: str = Field(description="Text to score; every word counts as complete.", examples=["The cat sat on the mat."])
    model: str | None = _model_field()
    version: OptInt = _version_field()


class WordScore(BaseModel):
    word: str
    log_prob: float = Field(description="log P(word | everything before it), natural log.")
    rank: int = Field(description="Words the model scored strictly above this one (0 = top-1).")
    oov: bool = Field(description="Out of vocabulary: scored as <unk>.")


class ScoreResponse(BaseModel):
    model: str
    version: int
    words: list[WordScore]
    num_words: int
    total_log_prob: float
    perplexity: float = Field(description="exp(-total_log_prob / num_words).")


# --- models ---------------------------------------------------------------------------------------


class ModelVersionInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    version: int
    status: Literal["serving", "loaded", "failed"]
    error: str | None = Field(None, description="Why loading failed (or why a rewrite of this version failed).")
    device: str | None = None
    device_note: str | None = Field(None, description="E.g. device auto falling back to CPU.")
    cell: str | None = None
    vocab_size: int | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    embedding_size: int | None = None
    weights_dtype: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="Evaluation figures from the model card.")
    created: str | None = None
    loaded_at: float | None = Field(None, description="Unix time the version went live.")


class ModelInfo(BaseModel):
    name: str
    serving_version: int | None = Field(description="The version answering requests that name none.")
    versions: list[ModelVersionInfo] = Field(description="Newest first.")


def model_info(name: str, versions: list[VersionInfo]) -> ModelInfo:
    """The engine's view of a model's versions as the API reports it (the one place that converts)."""
    serving = next((v.version for v in versions if v.status == SERVING), None)
    fields = set(ModelVersionInfo.model_fields)
    return ModelInfo(
        name=name, serving_version=serving,
        versions=[ModelVersionInfo(**{k: v for k, v in asdict(info).items() if k in fields}) for info in versions],
    )


class ModelsResponse(BaseModel):
    default_model: str | None
    device: str = Field(description="Configured device (auto/cpu/cuda).")
    providers: list[str] = Field(description="onnxruntime execution providers in use.")
    device_note: str | None = None
    models: list[ModelInfo]


class ReloadResponse(BaseModel):
    loaded: list[str] = Field(description="'<name>/<version>' newly loaded.")
    failed: list[dict[str, Any]] = Field(description="{model, version, error} for each version that failed.")
    unloaded: list[str]
    models: list[ModelInfo]


# --- health ---------------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    models: dict[str, int] = Field(description="Serving version per loaded model.")
    draining: bool = Field(False, description="Shutting down: not ready whatever is loaded (service/api/shutdown.py).")
