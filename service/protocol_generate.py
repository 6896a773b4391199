"""Request and response bodies of generation (``/v1/generate``), the OpenAI-compatible API
(``/openai/v1``) and the KServe v2 / Open Inference Protocol (``/v2``).

Fixed bounds (``n``, beam width, alternatives) come from the engine; the configurable one
(``max_words`` ≤ ``NEXTWORD_MAX_GENERATION_WORDS``) is checked by the engine, so a deployment can
change it without a code change. OpenAI bodies keep OpenAI's names, defaults and ranges; where
this service is narrower (``n`` ≤ 8, ``logprobs`` ≤ 5, word "tokens") it says so here and in
``docs/service.md``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine.generate import MAX_BEAM_WIDTH, MAX_COMPLETIONS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS
from service.protocol import MAX_K

# --- native generation ----------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str = Field(
        description="Text to continue. Ending inside a word makes the first generated word complete it "
        "(as /v1/predict does); ending in whitespace (or empty) starts a new word.",
        examples=["The quick brown fox jumps over the la"],
    )
    max_words: int = Field(16, ge=0, description="Most words per completion (≤ NEXTWORD_MAX_GENERATION_WORDS).")
    strategy: Literal["greedy", "sample", "beam"] = Field(
        "greedy", description="greedy: the most likely word each step; sample: temperature/top_k/top_p "
        "sampling (seeded by seed); beam: beam search of beam_width hypotheses."
    )
    temperature: float = Field(1.0, ge=0, le=100, description="sample: softmax temperature (0 = greedy).")
    top_k: int = Field(0, ge=0, description="sample: keep only the k most likely words (0 = all).")
    top_p: float = Field(1.0, ge=0, le=1, description="sample: nucleus, the smallest set with this much mass.")
    seed: int | None = Field(None, description="sample: same seed, same prompt, same model version → same words.")
    beam_width: int = Field(4, ge=1, le=MAX_BEAM_WIDTH, description="beam: hypotheses kept per step.")
    length_penalty: float = Field(
        1.0, ge=0, le=10, description="beam: hypotheses rank by sum(log p) / length ** length_penalty."
    )
    n: int = Field(1, ge=1, le=MAX_COMPLETIONS, description="Completions to return (beam: the best n ≤ beam_width).")
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings; the completion ends before the first one it contains."
    )
    logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="Top alternatives to report per word.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="greedy/sample: OpenAI's frequency penalty.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="greedy/sample: OpenAI's presence penalty.")
    stream: bool = Field(False, description="Server-sent events: one `word` event per word, then `done`.")
    model: str | None = Field(None, description="Model name; default: NEXTWORD_DEFAULT_MODEL or the first one.")
    version: int | None = Field(None, ge=1, description="Model version; default: the newest loaded one.")


class WordAlternative(BaseModel):
    word: str
    text: str = Field(description="How the word would have been written at this point.")
    log_prob: float


class GeneratedWordOut(BaseModel):
    word: str = Field(description="The model word (lowercase).")
    text: str = Field(description="What it adds to the completion text (leading space included).")
    log_prob: float = Field(description="Model log-probability (renormalised over prefix matches for a "
                            "word completing the prompt's last word).")
    top: list[WordAlternative] | None = Field(None, description="The most likely words at this step (logprobs).")


class GeneratedCompletion(BaseModel):
    index: int
    text: str = Field(description="The generated text; prompt + text is the continued prompt.")
    words: list[GeneratedWordOut]
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended the text (<eos>) or a stop string was reached; length: max_words."
    )
    log_prob: float = Field(description="Sum of the words' log-probabilities.")


class GenerateUsage(BaseModel):
    prompt_words: int = Field(description="Prompt words the model read (after the context budget).")
    completion_words: int
    total_words: int


class GenerateResponse(BaseModel):
    model: str
    version: int
    prefix: str = Field(description="The word fragment the first word completes ('' for none).")
    truncated: bool = Field(description="True when the prompt was longer than NEXTWORD_CONTEXT_WORDS words.")
    completions: list[GeneratedCompletion]
    usage: GenerateUsage


# --- OpenAI-compatible ----------------------------------------------------------------------------

OPENAI_MAX_LOGPROBS = 5  # as OpenAI's legacy completions API
OPENAI_MAX_STOP = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    """OpenAI's ``POST /v1/completions`` body. A "token" here is a word."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="'name' (its newest version) or 'name:version'.")
    prompt: str | list[str] | list[int] | list[list[int]] | None = Field(
        None, description="Text or list of texts (token-id prompts are rejected: this service reads words)."
    )
    max_tokens: int | None = Field(16, ge=0, description="Most words per completion (≤ NEXTWORD_MAX_GENERATION_WORDS).")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float | None = Field(1.0, ge=0, le=1)
    n: int | None = Field(1, ge=1, le=MAX_COMPLETIONS, description=f"Completions per prompt (≤ {MAX_COMPLETIONS}).")
    best_of: int | None = Field(None, ge=1, le=MAX_COMPLETIONS, description="Generate this many, return the best n.")
    stop: str | list[str] | None = Field(None, description=f"Up to {OPENAI_MAX_STOP} stop strings.")
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=OPENAI_MAX_LOGPROBS, description="Top alternatives per word (≤ 5).")
    echo: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (model tokens are words); "
                                                 "a non-empty map is rejected.")
    suffix: str | None = Field(None, description="Not supported; a non-null value is rejected.")
    user: str | None = Field(None, description="Accepted and ignored.")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# --- KServe v2 / Open Inference Protocol ----------------------------------------------------------

KSERVE_DEFAULT_K = 5
KSERVE_MAX_K = MAX_K


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class InferInputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutputTensor]
