"""Request and response bodies of native generation (``POST /v1/generate``).

Fixed bounds (``n``, beam width, alternatives) come from the engine; the configurable one
(``max_words`` ≤ ``NEXTWORD_MAX_GENERATION_WORDS``) is checked by the engine, so a deployment can
change it without a code change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.protocol.native import Int, OptInt
from service.engine.generate import MAX_BEAM_WIDTH, MAX_COMPLETIONS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)

    prompt: str = Field(
        description="Text to continue. Ending inside a word makes the first generated word complete it "
        "(as /v1/predict does); ending in whitespace (or empty) starts a new word.",
        examples=["The quick brown fox jumps over the la"],
    )
    max_words: Int = Field(16, ge=0, description="Most words per completion (≤ NEXTWORD_MAX_GENERATION_WORDS).")
    strategy: Literal["greedy", "sample", "beam"] = Field(
        "greedy", description="greedy: the most likely word each step; sample: temperature/top_k/top_p "
        "sampling (seeded by seed); beam: beam search of beam_width hypotheses."
    )
    temperature: float = Field(1.0, ge=0, le=100, description="sample: softmax temperature (0 = greedy).")
    top_k: Int = Field(0, ge=0, description="sample: keep only the k most likely words (0 = all).")
    top_p: float = Field(1.0, ge=0, le=1, description="sample: nucleus, the smallest set with this much mass.")
    seed: OptInt = Field(None, description="sample: same seed, same prompt, same model version → same words.")
    beam_width: Int = Field(4, ge=1, le=MAX_BEAM_WIDTH, description="beam: hypotheses kept per step.")
    length_penalty: float = Field(
        1.0, ge=0, le=10, description="beam: hypotheses rank by sum(log p) / length ** length_penalty."
    )
    n: Int = Field(1, ge=1, le=MAX_COMPLETIONS, description="Completions to return (beam: the best n ≤ beam_width).")
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings; the completion ends before the first one it contains."
    )
    logprobs: Int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="Top alternatives to report per word.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="greedy/sample: OpenAI's frequency penalty.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="greedy/sample: OpenAI's presence penalty.")
    stream: bool = Field(False, description="Server-sent events: one `word` event per word, then `done`.")
    filter: bool = Field(True, description="Never generate (or list as alternatives) blocklisted words "
                         "(NEXTWORD_BLOCKLIST); false allows every word.")
    model: str | None = Field(None, description="Model name; default: NEXTWORD_DEFAULT_MODEL or the first one.")
    version: OptInt = Field(None, ge=1, description="Model version; default: the newest loaded one.")


class WordAlternative(BaseModel):
    word: str = Field(description="The model word (lowercase).")
    text: str = Field(description="How the word would have been written at this point (its usual form when the "
                      "model has casing statistics).")
    log_prob: float


class GeneratedWordOut(BaseModel):
    word: str = Field(description="The model word (lowercase).")
    text: str = Field(description="What it adds to the completion text (leading space included), written in the "
                      "word's usual form when the model has casing statistics (\"I\", \"John\", a capital after a "
                      "sentence end).")
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


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """A ``stop`` field (one string or a list, as both the native and the OpenAI API take it) as the
    engine's tuple."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)
