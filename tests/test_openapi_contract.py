"""The OpenAPI document says what the server does (service/api/openapi.py).

* Limits the handlers check from settings appear in the schema (``maxLength``, ``maximum``,
  ``maxItems``, the session-id ``pattern``), with the configured values, so a client generating
  requests from the document stays within what is accepted.
* Request bodies are strictly typed: JSON's ``true`` is not the version 1, ``0`` is not
  ``stream: false`` (pydantic's lax mode accepted both); an integer still fills a float field.
* ``OPTIONS`` and 405 answers list every method the path serves (Starlette listed only the first
  matching route's).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.sessions.store import SESSION_ID


@pytest.fixture(scope="module")
def settings(model_repository: Path) -> Settings:
    return Settings(model_repository=model_repository, device="cpu", intra_op_threads=1, reload_interval_seconds=0,
                    max_text_chars=300, max_delta_chars=40, max_batch_items=3, max_generation_words=7,
                    session_max_ttl_seconds=600, session_store="memory", log_level="warning")


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def document(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def _property(document: dict[str, Any], schema: str, name: str) -> dict[str, Any]:
    """The property's schema, or its non-null branch when it is optional."""
    found = document["components"]["schemas"][schema]["properties"][name]
    branches = [b for b in found.get("anyOf", [found]) if b.get("type") != "null"]
    assert len(branches) == 1, found
    return branches[0]


# --------------------------------------------------------------------------- limits in the schema


@pytest.mark.parametrize(("schema", "name", "keyword", "value"), [
    ("PredictRequest", "text", "maxLength", 300),
    ("ScoreRequest", "text", "maxLength", 300),
    ("ScoreRequest", "text", "minLength", 1),
    ("GenerateRequest", "prompt", "maxLength", 300),
    ("GenerateRequest", "max_words", "maximum", 7),
    ("CompletionRequest", "max_tokens", "maximum", 7),
    ("BatchPredictRequest", "items", "maxItems", 3),
    ("SessionCreateRequest", "text", "maxLength", 300),
    ("SessionCreateRequest", "ttl_seconds", "maximum", 600),
    ("SessionUpdateRequest", "text", "maxLength", 40),
    ("SessionUpdateRequest", "replace_pending", "maxLength", 40),
])
def test_configured_limits_are_in_the_schema(
    document: dict[str, Any], schema: str, name: str, keyword: str, value: int
) -> None:
    assert _property(document, schema, name)[keyword] == value


def test_session_id_parameters_carry_the_id_pattern(document: dict[str, Any]) -> None:
    checked = 0
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "session_id":
                    assert parameter["schema"]["pattern"] == SESSION_ID.pattern, path
                    checked += 1
    assert checked == 3  # GET and DELETE /v1/sessions/{session_id}, POST .../text


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/generate", {"prompt": "the", "max_words": 8}, "max_words"),
    ("/openai/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 8}, "max_tokens"),
    ("/v1/predict/batch", {"items": [{"text": "a"}] * 4}, "items"),
    ("/v1/predict", {"text": "a" * 301}, "text"),
    ("/v1/sessions", {"ttl_seconds": 601}, "ttl_seconds"),
])
def test_values_past_the_documented_limits_are_refused(client: TestClient, path: str, body: dict, field: str) -> None:
    """The schema's bound is the server's: one past it is a 4xx naming the field."""
    r = client.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert field in (error.get("param") or error.get("field") or ""), error


def test_score_text_pattern_matches_what_the_tokenizer_scores(document: dict[str, Any], client: TestClient) -> None:
    """A text the schema allows has a word to score; one it refuses has none (422)."""
    import re

    pattern = re.compile(_property(document, "ScoreRequest", "text")["pattern"])
    for text in ("_", " _ \t__", "\u2003", "\x1c"):
        assert not pattern.search(text), repr(text)
        assert client.post("/v1/score", json={"text": text}).status_code == 422, repr(text)
    for text in ("a", "_a_", "!", " .", "é", "9"):
        assert pattern.search(text), repr(text)
        assert client.post("/v1/score", json={"text": text}).status_code == 200, repr(text)


# --------------------------------------------------------------------------- strict types


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/generate", {"prompt": "the", "stream": 0}, "stream"),
    ("/v1/generate", {"prompt": "the", "presence_penalty": False}, "presence_penalty"),
    ("/v1/generate", {"prompt": "the", "version": True}, "version"),
    ("/v1/generate", {"prompt": "the", "max_words": "3"}, "max_words"),
    ("/v1/predict", {"text": "the", "version": True}, "version"),
    ("/v1/predict", {"text": "the", "k": 2.5}, "k"),
    ("/v1/predict", {"text": "the", "learn": 1}, "learn"),
    ("/v1/predict", {"text": 5}, "text"),
    ("/v1/score", {"text": "the", "version": True}, "version"),
    ("/v1/sessions", {"text": "the", "rotate": "yes"}, "rotate"),
])
def test_native_bodies_are_strictly_typed(client: TestClient, path: str, body: dict, field: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


@pytest.mark.parametrize(("body", "param"), [
    ({"stream": 0}, "stream"),
    ({"presence_penalty": False}, "presence_penalty"),
    ({"echo": "true"}, "echo"),
    ({"n": True}, "n"),
])
def test_openai_bodies_are_strictly_typed(client: TestClient, body: dict, param: str) -> None:
    r = client.post("/openai/v1/completions", json={"model": "tiny", "prompt": "the", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/predict", {"text": "the ", "k": 3.0, "version": 1.0}),
    ("/v1/generate", {"prompt": "the", "max_words": 2.0, "n": 1.0}),
    ("/openai/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 2.0, "n": 1.0}),
    ("/v1/sessions", {"text": "the ", "ttl_seconds": 60.0, "k": 2.0}),
])
def test_integral_numbers_are_integers(client: TestClient, path: str, body: dict) -> None:
    """JSON Schema's integer is any number without a fraction: 3.0 is 3 (and 3.5 is refused)."""
    assert client.post(path, json=body).status_code in (200, 201), client.post(path, json=body).text
    key = next(k for k in body if k not in ("text", "prompt", "model"))
    assert 400 <= client.post(path, json={**body, key: 2.5}).status_code < 500


def test_integers_still_fill_float_fields(client: TestClient) -> None:
    r = client.post("/v1/generate", json={"prompt": "the", "max_words": 2, "temperature": 1, "presence_penalty": 0})
    assert r.status_code == 200, r.text
    r = client.post("/openai/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 2,
                                                    "temperature": 0, "top_p": 1})
    assert r.status_code == 200, r.text


def test_stream_query_parameters_are_still_read_from_strings(client: TestClient) -> None:
    with client.websocket_connect("/v1/sessions/stream?version=1&k=2&learn=false&text=the%20") as ws:
        opened = ws.receive_json()
        assert opened["type"] == "session" and opened["version"] == 1, opened
        assert len(opened["predictions"]["predictions"]) == 2 and opened["learn"] is False, opened


# --------------------------------------------------------------------------- Allow


def _allow(response: Any) -> set[str]:
    return {m.strip() for m in response.headers["allow"].split(",")}


def test_options_lists_every_documented_method(client: TestClient, document: dict[str, Any]) -> None:
    examples = {"{session_id}": "a" * 20, "{name}": "tiny", "{model}": "tiny", "{version}": "1"}
    for template, operations in document["paths"].items():
        path = template
        for placeholder, value in examples.items():
            path = path.replace(placeholder, value)
        r = client.options(path)
        assert r.status_code == 204, (path, r.status_code)
        assert {m.upper() for m in operations} <= _allow(r), (path, r.headers["allow"])


def test_reported_cases(client: TestClient) -> None:
    assert _allow(client.options("/v1/models/reload")) == {"POST"}
    assert {"GET", "DELETE"} <= _allow(client.options("/v1/sessions/" + "a" * 20))


def test_405_lists_every_method_in_each_front_ends_shape(client: TestClient) -> None:
    r = client.put("/v1/sessions/" + "a" * 20)
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    assert _allow(r) == {"GET", "HEAD", "DELETE"}
    r = client.put("/v1/models/reload")  # the reload resource: not the /v1/models/{name} template's GET
    assert r.status_code == 405 and _allow(r) == {"POST"}
    r = client.delete("/v2/models/tiny/infer")
    assert r.status_code == 405 and isinstance(r.json()["error"], str) and _allow(r) == {"POST"}


# --------------------------------------------------------------------------- found by schemathesis


def test_an_update_without_text_answers_the_predictions_again(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json={"text": "the quick "}).json()["session_id"]
    first = client.post(f"/v1/sessions/{sid}/text", json={"text": "br"}).json()
    again = client.post(f"/v1/sessions/{sid}/text", json={})
    assert again.status_code == 200, again.text
    assert again.json()["predictions"] == first["predictions"] and again.json()["pending"] == "br"


def test_openai_empty_suffix_and_logit_bias_are_none(client: TestClient, document: dict[str, Any]) -> None:
    body = {"model": "tiny", "prompt": "the", "max_tokens": 1, "suffix": "", "logit_bias": {}}
    assert client.post("/openai/v1/completions", json=body).status_code == 200
    r = client.post("/openai/v1/completions", json={**body, "suffix": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert _property(document, "CompletionRequest", "suffix")["maxLength"] == 0
    assert _property(document, "CompletionRequest", "logit_bias")["maxProperties"] == 0
    prompt = document["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"string", "array", "null"} == {b["type"] for b in prompt}  # no token-id prompts
    assert next(b for b in prompt if b["type"] == "array")["items"] == {"type": "string", "maxLength": 300}


def test_kserve_readiness_of_what_does_not_exist_is_404(client: TestClient) -> None:
    assert client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    for path in ("/v2/models/nope/ready", "/v2/models/tiny/versions/7/ready", "/v2/models/tiny/versions/0/ready"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["ready"] is False, path


def test_kserve_sequence_id_false_is_not_no_sequence(client: TestClient) -> None:
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["the "]}]}
    assert client.post("/v2/models/tiny/infer", json={**body, "parameters": {"sequence_id": 0}}).status_code == 200
    r = client.post("/v2/models/tiny/infer", json={**body, "parameters": {"sequence_id": False}})
    assert r.status_code == 400 and "sequence_id" in r.json()["error"]
    r = client.post("/v2/models/tiny/infer", json={**body, "parameters": {"k": 2.0}})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 2]
    r = client.post("/v2/models/tiny/infer", json={"inputs": [{**body["inputs"][0], "shape": ["1"]}]})
    assert r.status_code == 400  # strict: a string is not a shape


def test_streams_and_the_kserve_body_are_documented(document: dict[str, Any]) -> None:
    generate = document["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]
    events = generate["text/event-stream"]["schema"]["oneOf"]
    assert [e["properties"]["event"]["const"] for e in events] == ["word", "done", "error"]
    completions = document["paths"]["/openai/v1/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in completions and "application/json" in completions
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert list(infer) == ["application/json"]  # the binary extension is prose, not "any bytes"
    tensor = infer["application/json"]["schema"]["properties"]["inputs"]["items"]
    assert tensor["properties"]["datatype"] == {"const": "BYTES"}
