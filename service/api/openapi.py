"""The OpenAPI document says what the server enforces, and 405/OPTIONS answers list every method.

Limits that come from settings (``NEXTWORD_MAX_GENERATION_WORDS``, ``NEXTWORD_MAX_TEXT_CHARS``,
...) are checked in the handlers, so the request models cannot carry them; :func:`install_openapi`
writes them into the generated document as ``maximum``/``maxLength``/``maxItems``/``pattern``, so
a client (or a schema-driven tester) generating from the document stays within what is accepted.

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

from service.config import Settings
from service.sessions.store import SESSION_ID

# A text has a word to score when it has a character other than whitespace and "_" (the tokenizer
# reads any letter, digit or mark; "_" alone, or only whitespace, is "no words to score": 422).
SCORABLE = r"[^\s_]"


def _limits(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    """(schema, property) → keywords to add to it (to the non-null branch of an optional)."""
    text = {"maxLength": settings.max_text_chars}
    delta = {"maxLength": settings.max_delta_chars}
    words = {"maximum": settings.max_generation_words}
    return {
        ("PredictRequest", "text"): text,
        ("ScoreRequest", "text"): {**text, "minLength": 1, "pattern": SCORABLE},
        ("BatchPredictRequest", "items"): {"maxItems": settings.max_batch_items},
        ("GenerateRequest", "prompt"): text,
        ("GenerateRequest", "max_words"): words,
        ("CompletionRequest", "max_tokens"): words,
        ("SessionCreateRequest", "text"): text,
        ("SessionCreateRequest", "ttl_seconds"): {"maximum": int(settings.session_max_ttl_seconds)},
        ("SessionUpdateRequest", "text"): delta,
        ("SessionUpdateRequest", "replace_pending"): delta,
    }


def _patch(schema: dict[str, Any], extra: dict[str, Any]) -> None:
    branches = schema.get("anyOf")
    targets = [b for b in branches if b.get("type") != "null"] if branches else [schema]
    for target in targets:
        if "type" in target or "$ref" not in target:
            target.update(extra)


def apply_limits(document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    schemas = document.get("components", {}).get("schemas", {})
    for (name, prop), extra in _limits(settings).items():
        found = schemas.get(name, {}).get("properties", {}).get(prop)
        if found is not None:
            _patch(found, extra)
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if parameter.get("name") == "session_id" and parameter.get("in") == "path":
                    parameter["schema"]["pattern"] = SESSION_ID.pattern
                if path.endswith("/stream") and parameter.get("name") == "ttl_seconds":
                    _patch(parameter["schema"], {"maximum": int(settings.session_max_ttl_seconds)})
    return document


def install_openapi(app: FastAPI, settings: Settings) -> None:
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = apply_limits(generate(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _route_table(app: Any) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """(path regex, methods) of every HTTP route, included routers' routes flattened (FastAPI ≥ 0.16x
    wraps them in one entry per router; ``iter_route_contexts`` walks them), built once per app."""
    table: list[tuple[re.Pattern[str], frozenset[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        walk = getattr(fastapi.routing, "iter_route_contexts", None)
        routes = walk(app.routes) if walk is not None else app.routes
        table = []
        for route in routes:
            path, methods = getattr(route, "path", None), getattr(route, "methods", None)
            if path and methods:
                table.append((compile_path(path)[0], frozenset(methods)))
        app.state.allow_table = table
    return table


def allowed_methods(app: Any, scope: dict[str, Any]) -> list[str]:
    """Every method some route of ``app`` serves at the request's path."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):  # ASGI's path includes the mount point; routes do not
        path = path[len(root):]
    methods: set[str] = set()
    for regex, route_methods in _route_table(app):
        if regex.match(path):
            methods |= route_methods
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
