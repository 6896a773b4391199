"""``POST /v1/generate``: multi-word completion, as one JSON body or as server-sent events.

Only protocol translation lives here; generation itself is :mod:`service.engine.generate`.

Streaming (``stream: true``, ``text/event-stream``)::

    event: word
    data: {"index": 0, "word": "fox", "text": " fox", "log_prob": -2.1, "top": null}

    event: done
    data: {"model": "tiny", "version": 2, "prefix": "", "truncated": false,
           "completions": [{"index": 0, "finish_reason": "stop", "text": " fox", "num_words": 1, "log_prob": -2.1}],
           "usage": {...}}

Errors found before the first event are ordinary HTTP errors; one that happens mid-stream (e.g.
the deadline of a step) is sent as ``event: error`` with the usual error body and ends the stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api.body import CheckedRoute
from service.api.deps import PredictorDep
from service.api.errors import describe_error, native_error_body
from service.api.protocol.generate import (
    GeneratedCompletion,
    GeneratedWordOut,
    GenerateRequest,
    GenerateResponse,
    GenerateUsage,
    WordAlternative,
    stop_strings,
)
from service.api.protocol.native import ErrorResponse
from service.engine.errors import EngineError
from service.engine.generate import (
    CompletionResult,
    Event,
    FinishEvent,
    GeneratedWord,
    Generation,
    GenerationParams,
    Generator,
)

log = logging.getLogger("service.api.routes.generate")

router = APIRouter(prefix="/v1", tags=["generation"], route_class=CheckedRoute)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}



def sse_event(name: str, required: list[str]) -> dict[str, Any]:
    """The schema of one server-sent event named ``name`` whose data is a JSON object."""
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"type": "object", "required": required}},
        },
    }


# Each event of the stream (the document's text/event-stream schema describes one event).
SSE_EVENT_SCHEMA: dict[str, Any] = {"oneOf": [
    sse_event("word", ["index", "word", "text", "log_prob"]),
    sse_event("done", ["model", "version", "completions", "usage"]),
    sse_event("error", ["status", "error"]),
]}

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
          "description": "JSON (stream false) or server-sent events (stream true)"},
    400: {"model": ErrorResponse, "description": "Malformed JSON or non-UTF-8 body"},
    404: {"model": ErrorResponse, "description": "Unknown model or version"},
    413: {"model": ErrorResponse, "description": "Prompt or body over the limit"},
    422: {"model": ErrorResponse, "description": "Invalid field (e.g. max_words over NEXTWORD_MAX_GENERATION_WORDS)"},
    503: {"model": ErrorResponse, "description": "Queue full or no model loaded (see Retry-After)"},
    504: {"model": ErrorResponse, "description": "Deadline exceeded while queued"},
}


def params_of(body: GenerateRequest) -> GenerationParams:
    return GenerationParams(
        max_words=body.max_words, strategy=body.strategy, temperature=body.temperature, top_k=body.top_k,
        top_p=body.top_p, seed=body.seed, beam_width=body.beam_width, length_penalty=body.length_penalty,
        n=body.n, stop=stop_strings(body.stop), logprobs=body.logprobs,
        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty, filter=body.filter,
    )


def word_out(w: GeneratedWord) -> GeneratedWordOut:
    top = None if w.top is None else [WordAlternative(word=a.word, text=a.text, log_prob=a.log_prob) for a in w.top]
    return GeneratedWordOut(word=w.word, text=w.text, log_prob=w.log_prob, top=top)


def usage_of(generation: Generation, completions: list[CompletionResult]) -> GenerateUsage:
    words = sum(len(c.words) for c in completions)
    prompt = generation.plan.context_words
    return GenerateUsage(prompt_words=prompt, completion_words=words, total_words=prompt + words)


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event (JSON on a single ``data:`` line, so no escaping rules apply)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@router.post("/generate", response_model=GenerateResponse, responses=_RESPONSES)
async def generate(body: GenerateRequest, predictor: PredictorDep) -> Any:
    """Continue a prompt with one or more multi-word completions (greedy, sampled or beam search).

    With ``stream: true`` the answer is ``text/event-stream``: an ``event: word`` per generated
    word as soon as it is final, then one ``event: done`` with every completion's finish reason."""
    generation = await Generator(predictor).start(body.prompt, params_of(body), body.model, body.version)
    if not body.stream:
        completions = await generation.run()
        return GenerateResponse(
            model=generation.model, version=generation.model_version, prefix=generation.plan.prefix,
            truncated=generation.plan.truncated, usage=usage_of(generation, completions),
            completions=[
                GeneratedCompletion(index=c.index, text=c.text, finish_reason=c.finish_reason, log_prob=c.log_prob,
                                    words=[word_out(w) for w in c.words])
                for c in completions
            ],
        )
    events = generation.events()
    first = await anext(events)  # the first step's errors still become an HTTP status
    return StreamingResponse(_stream(generation, first, events), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _stream(generation: Generation, first: Event, events: AsyncIterator[Event]) -> AsyncIterator[str]:
    finished: list[CompletionResult] = []

    def render(event: Event) -> str | None:
        if isinstance(event, FinishEvent):
            finished.append(event.completion)
            return None
        return sse("word", {"index": event.index, **word_out(event.word).model_dump()})

    try:
        async with contextlib.aclosing(events):  # client gone: stop stepping at once
            if (chunk := render(first)) is not None:
                yield chunk
            async for event in events:
                if (chunk := render(event)) is not None:
                    yield chunk
    except EngineError as exc:
        e = describe_error(exc)
        log.warning("generation stream failed after it started: %s", e.message)
        status, body = native_error_body(e)
        yield sse("error", {"status": status, **body})
        return
    finished.sort(key=lambda c: c.index)
    yield sse("done", {
        "model": generation.model, "version": generation.model_version, "prefix": generation.plan.prefix,
        "truncated": generation.plan.truncated,
        "completions": [
            {"index": c.index, "finish_reason": c.finish_reason, "text": c.text, "num_words": len(c.words),
             "log_prob": c.log_prob}
            for c in finished
        ],
        "usage": usage_of(generation, finished).model_dump(),
    })
