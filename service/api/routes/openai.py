"""OpenAI-compatible API under ``/openai/v1`` (``base_url="http://host:8000/openai/v1"``).

``GET /models``, ``GET /models/{model}`` and the legacy ``POST /completions`` (the one that takes
a ``prompt``), translated onto :mod:`service.engine.generate`. A "token" is a *word* here:
``max_tokens`` counts words, ``logprobs`` reports words, ``usage`` counts words.

Model ids: ``name`` (the newest loaded version, like the native API) or ``name:version``; responses
name the version that answered (``name:version``), as OpenAI names the snapshot.

Fields follow OpenAI's defaults and ranges. Unsupported ones are rejected, as OpenAI rejects what
a model cannot do: ``suffix`` (not null), ``logit_bias`` (not empty: model tokens are words, not
OpenAI token ids), token-id prompts, ``best_of`` with ``stream``; unknown fields get OpenAI's
``Unrecognized request argument supplied``. ``user`` is accepted and ignored. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (see ``service/api/errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.body import CheckedRoute
from service.api.deps import PredictorDep, RepositoryDep, SettingsDep
from service.api.errors import describe_error, openai_error_body, shaped_error
from service.api.limits import check_batch_items
from service.api.protocol.generate import stop_strings
from service.api.protocol.openai import (
    OPENAI_MAX_STOP,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    OpenAIModel,
    OpenAIModelList,
)
from service.engine import LoadedVersion, ModelRepository, Predictor
from service.engine.errors import (
    EngineError,
    InvalidInputError,
    ModelNotFoundError,
    TextTooLongError,
    VersionNotFoundError,
)
from service.engine.generate import (
    SAMPLE,
    CompletionResult,
    FinishEvent,
    GeneratedWord,
    Generation,
    GenerationParams,
    Generator,
    WordEvent,
    render_word,
)

log = logging.getLogger("service.api.routes.openai")

router = APIRouter(prefix="/openai/v1", tags=["openai"], route_class=CheckedRoute)

OWNER = "nextword"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _openai_errors() -> dict[int | str, dict[str, Any]]:
    example = {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": "validation_error"}}
    body = {"content": {"application/json": {"example": example}}}
    return {
        400: {"description": "Invalid request (OpenAI error body)", **body},
        404: {"description": "Unknown model", **body},
        413: {"description": "Prompt or body over the limit", **body},
        503: {"description": "Queue full or no model loaded (see Retry-After)", **body},
        504: {"description": "Deadline exceeded while queued", **body},
    }


# --- models -------------------------------------------------------------------------------------


def parse_model_id(model: str) -> tuple[str, int | None]:
    """``name`` or ``name:version`` (a name may itself contain ``:`` when no version follows)."""
    name, sep, version = model.rpartition(":")
    if sep and name and version.isdigit() and int(version) >= 1:
        return name, int(version)
    return model, None


def model_id(lv: LoadedVersion) -> str:
    return f"{lv.name}:{lv.version}"


def _created(lv: LoadedVersion) -> int:
    with contextlib.suppress(ValueError):
        if lv.card.created:
            return int(datetime.fromisoformat(lv.card.created.replace("Z", "+00:00")).timestamp())
    return int(lv.loaded_at)


def _models(repository: ModelRepository) -> list[OpenAIModel]:
    out: list[OpenAIModel] = []
    serving = repository.serving()
    for name in sorted(serving):
        newest = serving[name]
        out.append(OpenAIModel(id=name, created=_created(newest), owned_by=OWNER))
        versions = repository.status(name).get(name, [])
        for info in versions:  # newest first
            try:
                lv = repository.resolve(name, info.version)
            except EngineError:
                continue  # failed versions are not servable
            out.append(OpenAIModel(id=model_id(lv), created=_created(lv), owned_by=OWNER))
    return out


def _model_not_found(request: Request, model: str) -> JSONResponse:
    return shaped_error(request, 404, "model_not_found", f"The model '{model}' does not exist", "model")


@router.get("/models", response_model=OpenAIModelList)
async def list_models(repository: RepositoryDep) -> OpenAIModelList:
    """Every servable model id: ``name`` (newest version) and ``name:version`` for each loaded version."""
    return OpenAIModelList(data=_models(repository))


@router.get("/models/{model}", response_model=OpenAIModel, responses=_openai_errors())
async def retrieve_model(model: str, request: Request, repository: RepositoryDep) -> Any:
    name, version = parse_model_id(model)
    try:
        lv = repository.resolve(name, version)
    except (ModelNotFoundError, VersionNotFoundError):
        return _model_not_found(request, model)
    return OpenAIModel(id=model if version is not None else name, created=_created(lv), owned_by=OWNER)


# --- completions --------------------------------------------------------------------------------


def _prompts(prompt: str | list[Any] | None) -> list[str]:
    if prompt is None:
        return [""]  # OpenAI's default is its end-of-text token: start a fresh text
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidInputError("prompt must not be an empty list", "prompt")
    if not all(isinstance(p, str) for p in prompt):
        raise InvalidInputError("token-id prompts are not supported: this model reads words, send text", "prompt")
    return list(prompt)


def _params(body: CompletionRequest, max_words_limit: int) -> tuple[GenerationParams, int]:
    """Engine parameters and how many completions to generate per prompt (``best_of``)."""
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens > max_words_limit:
        raise InvalidInputError(
            f"max_tokens is {max_tokens}; this server generates at most {max_words_limit} words (tokens are words)",
            "max_tokens",
        )
    n = body.n or 1
    best_of = body.best_of or n
    if best_of < n:
        raise InvalidInputError("best_of must be greater than or equal to n", "best_of")
    if body.stream and best_of > n:
        raise InvalidInputError("best_of cannot be used with stream", "best_of")
    if body.suffix:  # "" is no suffix
        raise InvalidInputError("suffix is not supported by this model", "suffix")
    if body.logit_bias:
        raise InvalidInputError("logit_bias is not supported: this model's tokens are words, not token ids",
                                "logit_bias")
    stop = stop_strings(body.stop)
    if len(stop) > OPENAI_MAX_STOP:
        raise InvalidInputError(f"stop accepts at most {OPENAI_MAX_STOP} sequences", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    params = GenerationParams(
        max_words=max_tokens, strategy=SAMPLE, temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, n=best_of, stop=stop,
        logprobs=body.logprobs or 0, frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0, filter=body.filter is not False,
    )
    return params, n


def _best(completions: list[CompletionResult], n: int) -> list[CompletionResult]:
    """OpenAI's best_of: the n with the highest log-probability per token (ties: generation order)."""
    if len(completions) <= n:
        return completions
    return sorted(completions, key=lambda c: (-c.mean_log_prob, c.index))[:n]


def _top_dict(w: GeneratedWord) -> dict[str, float]:
    """Alternatives keyed by their text, plus the chosen word (OpenAI: up to logprobs + 1 entries)."""
    top: dict[str, float] = {}
    for a in w.top or ():
        top.setdefault(a.text, a.log_prob)
    top.setdefault(w.text, w.log_prob)
    return top


def _logprobs(words: tuple[GeneratedWord, ...], base: int) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[w.text for w in words], token_logprobs=[w.log_prob for w in words],
        top_logprobs=[_top_dict(w) for w in words], text_offset=[base + w.offset for w in words],
    )


async def _echo_logprobs(predictor: Predictor, prompt: str, lv: LoadedVersion) -> CompletionLogprobs:
    """The prompt's own words for ``echo`` + ``logprobs``: each word's log-prob in context (scored
    from the text start, like /v1/score) and its span of the prompt text. Alternatives are not
    computed for prompt words (``null``, as OpenAI gives for the first prompt token)."""
    tokens: list[str] = []
    offsets: list[int] = []
    lps: list[float | None] = []
    try:
        scored = (await predictor.score(prompt, lv.name, lv.version)).words
    except TextTooLongError:
        raise
    except InvalidInputError:  # no words at all
        scored = []
    cursor = 0
    for ws in scored:
        if ws.word == "<eos>":
            continue  # a sentence boundary the tokenizer added: no text of its own
        found = None
        for form in dict.fromkeys((ws.word, render_word(ws.word))):
            found = re.compile(re.escape(form), re.IGNORECASE).search(prompt, cursor)
            if found:
                break
        end = found.end() if found else cursor
        tokens.append(prompt[cursor:end])
        offsets.append(cursor)
        lps.append(ws.log_prob)
        cursor = end
    if tokens and cursor < len(prompt):
        tokens[-1] += prompt[cursor:]
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=[None] * len(tokens),
                              text_offset=offsets)


def _join_logprobs(head: CompletionLogprobs, tail: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=head.tokens + tail.tokens, token_logprobs=head.token_logprobs + tail.token_logprobs,
        top_logprobs=head.top_logprobs + tail.top_logprobs, text_offset=head.text_offset + tail.text_offset,
    )


# Each event of a stream: data is a completion chunk (CompletionResponse's shape), or [DONE] last.
_STREAM_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"$ref": "#/components/schemas/CompletionResponse"}},
    ]}},
}
_COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": _STREAM_EVENT}},
          "description": "JSON (stream false) or server-sent events (stream true)"},
    **_openai_errors(),
}


@router.post("/completions", response_model=CompletionResponse, responses=_COMPLETION_RESPONSES)
async def create_completion(
    body: CompletionRequest, request: Request, predictor: PredictorDep, settings: SettingsDep
) -> Any:
    """OpenAI's (legacy) completions: continue each prompt with ``n`` sampled completions.

    ``temperature: 0`` is greedy. With ``stream: true`` the answer is ``text/event-stream`` of
    ``data: {completion chunk}`` events ending with ``data: [DONE]``."""
    prompts = _prompts(body.prompt)
    check_batch_items(len(prompts), settings, "prompts", "prompt")
    params, n = _params(body, settings.max_generation_words)
    name, version = parse_model_id(body.model)
    try:
        predictor.repository.resolve(name, version)
    except (ModelNotFoundError, VersionNotFoundError):
        return _model_not_found(request, body.model)
    generator = Generator(predictor)
    fields = ["prompt"] if len(prompts) == 1 else [f"prompt.{i}" for i in range(len(prompts))]
    generations = list(await asyncio.gather(*(
        generator.start(p, params, name, version, prompt_field=f) for p, f in zip(prompts, fields, strict=True)
    )))
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    served = model_id(generations[0].version)
    fingerprint = f"nextword-{served}"
    prompt_tokens = sum(g.plan.context_words for g in generations)
    want_logprobs = body.logprobs is not None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(generations, prompts, n, bool(body.echo), want_logprobs, include_usage,
                         completion_id, created, served, fingerprint, prompt_tokens)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)

    results = await asyncio.gather(*(g.run() for g in generations))
    choices: list[CompletionChoice] = []
    completion_tokens = 0
    for pi, (prompt, generation, completions) in enumerate(zip(prompts, generations, results, strict=True)):
        echo_lp = None
        if body.echo and want_logprobs:
            echo_lp = await _echo_logprobs(predictor, prompt, generation.version)
        for j, c in enumerate(_best(completions, n)):
            completion_tokens += len(c.words)
            logprobs = None
            if want_logprobs:
                logprobs = _logprobs(c.words, len(prompt))
                if echo_lp is not None:
                    logprobs = _join_logprobs(echo_lp, logprobs)
            choices.append(CompletionChoice(
                text=(prompt if body.echo else "") + c.text, index=pi * n + j, logprobs=logprobs,
                finish_reason=c.finish_reason,  # type: ignore[arg-type]
            ))
    return CompletionResponse(
        id=completion_id, created=created, model=served, system_fingerprint=fingerprint, choices=choices,
        usage=CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens),
    )


def _data(payload: dict[str, Any] | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, WordEvent | FinishEvent]]:
    """Events of several generations as they come (each keeps its own order)."""
    if len(generations) == 1:
        async with contextlib.aclosing(generations[0].events()) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, generation: Generation) -> None:
        try:
            async for event in generation.events():
                await queue.put((i, event))
            await queue.put((i, done))
        except Exception as exc:  # handed to the consumer, which reports it in the stream
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _stream(generations: list[Generation], prompts: list[str], n: int, echo: bool, want_logprobs: bool,
                  include_usage: bool, completion_id: str, created: int, model: str, fingerprint: str,
                  prompt_tokens: int) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": completion_id, "object": "text_completion", "created": created,
                                "model": model, "system_fingerprint": fingerprint, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return _data(body)

    def choice(index: int, text: str, logprobs: CompletionLogprobs | None = None,
               finish_reason: str | None = None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": logprobs.model_dump() if logprobs else None,
                "finish_reason": finish_reason}

    completion_tokens = 0
    try:
        if echo:
            for pi, prompt in enumerate(prompts):
                for j in range(n):
                    yield chunk([choice(pi * n + j, prompt)])
        async for pi, event in _merged(generations):
            index = pi * n + event.index
            if isinstance(event, WordEvent):
                completion_tokens += 1
                logprobs = _logprobs((event.word,), len(prompts[pi])) if want_logprobs else None
                yield chunk([choice(index, event.word.text, logprobs)])
            else:
                yield chunk([choice(index, "", None, event.completion.finish_reason)])
    except EngineError as exc:
        e = describe_error(exc)
        log.warning("completion stream failed after it started: %s", e.message)
        yield _data(openai_error_body(e.status, e.type, e.message, e.field))
        return
    if include_usage:
        yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens})
    yield _data("[DONE]")
