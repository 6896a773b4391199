"""Request and response bodies of the OpenAI-compatible API (``/openai/v1``).

OpenAI bodies keep OpenAI's names, defaults and ranges; where this service is narrower (``n`` ≤ 8,
``logprobs`` ≤ 5, word "tokens") it says so here and in ``docs/service.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.protocol.native import OptInt
from service.engine.generate import MAX_COMPLETIONS

OPENAI_MAX_LOGPROBS = 5  # as OpenAI's legacy completions API
OPENAI_MAX_STOP = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    """OpenAI's ``POST /v1/completions`` body. A "token" here is a word."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)

    model: str = Field(description="'name' (its newest version) or 'name:version'.")
    prompt: str | list[str] | list[int] | list[list[int]] | None = Field(
        None, description="Text or list of texts (token-id prompts are rejected: this service reads words)."
    )
    max_tokens: OptInt = Field(16, ge=0, description="Most words per completion (≤ NEXTWORD_MAX_GENERATION_WORDS).")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float | None = Field(1.0, ge=0, le=1)
    n: OptInt = Field(1, ge=1, le=MAX_COMPLETIONS, description=f"Completions per prompt (≤ {MAX_COMPLETIONS}).")
    best_of: OptInt = Field(None, ge=1, le=MAX_COMPLETIONS, description="Generate this many, return the best n.")
    stop: str | list[str] | None = Field(None, description=f"Up to {OPENAI_MAX_STOP} stop strings.")
    seed: OptInt = None
    logprobs: OptInt = Field(None, ge=0, le=OPENAI_MAX_LOGPROBS, description="Top alternatives per word (≤ 5).")
    echo: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (model tokens are words); "
                                                 "a non-empty map is rejected.")
    suffix: str | None = Field(None, description="Not supported; a non-null value is rejected.")
    user: str | None = Field(None, description="Accepted and ignored.")
    filter: bool | None = Field(True, description="Extension: never generate blocklisted words (NEXTWORD_BLOCKLIST); "
                                "false allows every word.")


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
