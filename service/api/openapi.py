"""The OpenAPI document says what the server enforces, and 405/OPTIONS answers list every method.

Limits that come from settings (``NEXTWORD_MAX_GENERATION_WORDS``, ``NEXTWORD_MAX_TEXT_CHARS``,
...) are checked in the handlers, so the request models cannot carry them; :func:`install_openapi`
writes them into the generated document as ``maximum``/``maxLength``/``maxItems``/``pattern``, so
a client (or a schema-driven tester) generating from the document stays within what is accepted.
So are the handlers' fixed rules that a schema can say (stop strings' count and length, the
unsupported ``suffix``/``logit_bias`` left empty, no token-id prompts). What a schema cannot say
(``best_of`` ≥ ``n``, a tensor's shape matching its data) stays in ``docs/service.md``.

Starlette answers 405 with the ``Allow`` of the *first* route whose path matches, so a path served
by several routes (``GET`` and ``DELETE /v1/sessions/{id}``) or shadowed by a template
(``/v1/models/{name}`` before ``POST /v1/models/reload``) got a wrong list; :func:`allowed_methods`
collects them from every route.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import fastapi.routing
from fastapi import FastAPI
from starlette.routing import compile_path

from service.api.protocol.openai import OPENAI_MAX_STOP
from service.config import Settings
from service.engine.generate import MAX_STOP_CHARS, MAX_STOP_STRINGS
from service.sessions.store import SESSION_ID

# A text has a word to score when it has a character other than whitespace and "_" (the tokenizer
# reads any letter, digit or mark; "_" alone, or only whitespace, is "no words to score": 422).
SCORABLE = r"[^\s_]"

# Keywords to add, by the JSON type of the branch they apply to (an optional's null branch, or a
# string-or-list field's other branch, is left alone).
Patch = dict[str, dict[str, Any]]


def _limits(settings: Settings) -> dict[tuple[str, str], Patch]:
    """(schema, property) → what to add to it."""
    text = {"maxLength": settings.max_text_chars}
    delta = {"string": {"maxLength": settings.max_delta_chars}}
    words = {"integer": {"maximum": settings.max_generation_words}}
    stop_chars = {"minLength": 1, "maxLength": MAX_STOP_CHARS}

    def stop(most: int) -> Patch:
        return {"string": stop_chars, "array": {"maxItems": most, "items": {"type": "string", **stop_chars}}}

    return {
        ("PredictRequest", "text"): {"string": text},
        ("ScoreRequest", "text"): {"string": {**text, "minLength": 1, "pattern": SCORABLE}},
        ("BatchPredictRequest", "items"): {"array": {"maxItems": settings.max_batch_items}},
        ("GenerateRequest", "prompt"): {"string": text},
        ("GenerateRequest", "max_words"): words,
        ("GenerateRequest", "stop"): stop(MAX_STOP_STRINGS),
        ("CompletionRequest", "prompt"): {
            "string": text,
            "array": {"minItems": 1, "maxItems": settings.max_batch_items, "items": {"type": "string", **text}},
        },
        ("CompletionRequest", "max_tokens"): words,
        ("CompletionRequest", "stop"): stop(OPENAI_MAX_STOP),
        ("CompletionRequest", "suffix"): {"string": {"maxLength": 0}},  # not supported: only "" (or null)
        ("CompletionRequest", "logit_bias"): {"object": {"maxProperties": 0}},  # not supported: only {}
        ("SessionCreateRequest", "text"): {"string": text},
        ("SessionCreateRequest", "ttl_seconds"): {"integer": {"maximum": int(settings.session_max_ttl_seconds)}},
        ("SessionUpdateRequest", "text"): delta,
        ("SessionUpdateRequest", "replace_pending"): delta,
    }


def _patch(schema: dict[str, Any], patch: Patch) -> None:
    for branch in schema.get("anyOf", [schema]):
        branch.update(patch.get(branch.get("type", ""), {}))


def _token_id_prompts(branch: dict[str, Any]) -> bool:
    items = branch.get("items", {})
    return branch.get("type") == "array" and (items.get("type") == "integer" or items.get("type") == "array")


def apply_limits(document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    schemas = document.get("components", {}).get("schemas", {})
    # Token-id prompts are accepted only to be refused with a clear message: not part of the API.
    prompt = schemas.get("CompletionRequest", {}).get("properties", {}).get("prompt")
    if prompt is not None and "anyOf" in prompt:
        prompt["anyOf"] = [b for b in prompt["anyOf"] if not _token_id_prompts(b)]
    for (name, prop), patch in _limits(settings).items():
        found = schemas.get(name, {}).get("properties", {}).get(prop)
        if found is not None:
            _patch(found, patch)
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if parameter.get("name") == "session_id" and parameter.get("in") == "path":
                    parameter["schema"]["pattern"] = SESSION_ID.pattern
    return document


def install_openapi(app: FastAPI, settings: Settings) -> None:
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = apply_limits(generate(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _route_table(app: Any) -> list[tuple[re.Pattern[str], bool, frozenset[str]]]:
    """(path regex, whether the path has no parameters, methods) of every HTTP route, built once per
    app; included routers' routes flattened (FastAPI ≥ 0.16x wraps them in one entry per router,
    which ``iter_route_contexts`` walks)."""
    table: list[tuple[re.Pattern[str], bool, frozenset[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        walk = getattr(fastapi.routing, "iter_route_contexts", None)
        routes = walk(app.routes) if walk is not None else app.routes
        table = []
        for route in routes:
            path, methods = getattr(route, "path", None), getattr(route, "methods", None)
            if path and methods:
                regex, _, convertors = compile_path(path)
                table.append((regex, not convertors, frozenset(methods)))
        app.state.allow_table = table
    return table


def allowed_methods(app: Any, scope: dict[str, Any]) -> list[str]:
    """Every method the routes of ``app`` serve at the request's path. A route without
    parameters names its resource: where one matches (``/v1/models/reload``), a template that
    would also match (``/v1/models/{name}``) is another resource and its methods are not listed."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):  # ASGI's path includes the mount point; routes do not
        path = path[len(root):]
    matches = [(static, methods) for regex, static, methods in _route_table(app) if regex.match(path)]
    exact = any(static for static, _ in matches)
    methods: set[str] = set()
    for static, route_methods in matches:
        if static or not exact:
            methods |= route_methods
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
