"""Access control against real servers: API keys on every front end (native, OpenAI client,
tritonclient, WebSocket), admin-only reload, sessions owned by their key, per-key rate limits
(shared through Redis), and the cross-site checks (form content types, WebSocket Origin, CORS)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from processes import REDIS_SERVER, RedisServer

pytestmark = [pytest.mark.e2e]

KEY, OTHER, ADMIN = "key-one-0123456789", "key-two-0123456789", "admin-key-0123456789"


@pytest.fixture(scope="module")
def keyed(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from conftest import _start_server

    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# one key per line\n{OTHER}\n")
    server = _start_server(model_repository, tmp_path_factory.mktemp("access-logs"), env={
        "NEXTWORD_API_KEYS": KEY, "NEXTWORD_API_KEYS_FILE": str(keys_file), "NEXTWORD_ADMIN_API_KEYS": ADMIN,
        "NEXTWORD_CORS_ALLOWED_ORIGINS": "https://app.example",
    })
    try:
        yield server.url
    finally:
        server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_front_end_needs_a_key_in_its_own_error_shape(keyed: str) -> None:
    with httpx.Client(base_url=keyed, timeout=30) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            assert c.get(path).status_code == 200, path  # probes, metrics and the static page stay open
        for headers in ({}, bearer("wrong"), {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
            r = c.post("/v1/predict", json={"text": "the "}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/openai/v1/completions", json={"model": "tiny", "prompt": "the"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v2/models/tiny/infer", json={"inputs": []})
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        for path in ("/v1/models", "/openapi.json", "/docs", "/v2/models/tiny"):
            assert c.get(path).status_code == 401, path
        assert c.post("/v1/predict", json={"text": "the "}, headers=bearer(KEY)).status_code == 200
        assert c.post("/v1/predict", json={"text": "the "}, headers=bearer(OTHER)).status_code == 200  # from the file


def test_openai_client_and_tritonclient_send_the_key(keyed: str) -> None:
    import numpy as np
    import openai
    import tritonclient.http as triton

    client = openai.OpenAI(base_url=f"{keyed}/openai/v1", api_key=KEY, timeout=60, max_retries=0)
    assert client.completions.create(model="tiny", prompt="the", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed}/openai/v1", api_key="nope", max_retries=0).models.list()

    t = triton.InferenceServerClient(keyed.removeprefix("http://"))
    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"the "], dtype=object))
    assert t.infer("tiny", [text], headers=bearer(KEY)).as_numpy("words").shape == (1, 5)
    with pytest.raises(Exception, match="API key"):
        t.infer("tiny", [text])


def test_reload_needs_an_admin_key(keyed: str) -> None:
    assert httpx.post(f"{keyed}/v1/models/reload", headers=bearer(KEY)).status_code == 403
    assert httpx.post(f"{keyed}/v1/models/reload", headers=bearer(ADMIN)).status_code == 200


def test_sessions_belong_to_the_key_that_created_them(keyed: str) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with httpx.Client(base_url=keyed, timeout=30) as c:
        sid = c.post("/v1/sessions", json={"model": "tiny", "text": "the "}, headers=bearer(KEY)).json()["session_id"]
        for method, path, body in [("GET", f"/v1/sessions/{sid}", None), ("DELETE", f"/v1/sessions/{sid}", None),
                                   ("POST", f"/v1/sessions/{sid}/text", {"text": "cat "})]:
            r = c.request(method, path, json=body, headers=bearer(OTHER))
            assert r.status_code == 404 and r.json()["error"]["type"] == "session_not_found", (method, r.text)
        assert c.get(f"/v1/sessions/{sid}", headers=bearer(KEY)).json()["committed_words"] == 1  # untouched

        # KServe sequences: the same sequence_id under two keys is two sequences.
        def step(key: str, text: str, **params: object) -> int:
            body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}],
                    "parameters": {"sequence_id": 5, **params}}
            return c.post("/v2/models/tiny/infer", json=body, headers=bearer(key)).status_code

        assert step(KEY, "the ", sequence_start=True) == 200
        assert step(OTHER, "cat ") == 400  # not active for this key
        assert step(KEY, "cat ", sequence_end=True) == 200

    ws_url = keyed.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"
    with pytest.raises(Exception, match="403"):
        connect(ws_url, open_timeout=30)  # no key: the handshake is refused
    with connect(ws_url, additional_headers=bearer(OTHER), open_timeout=30) as ws:
        reply = json.loads(ws.recv(timeout=30))
        assert reply["error"]["type"] == "session_not_found"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    with connect(ws_url, additional_headers=bearer(KEY), open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session"


def test_cross_site_requests_are_refused(keyed: str) -> None:
    from websockets.sync.client import connect

    with httpx.Client(base_url=keyed, timeout=30) as c:
        for path, body in [("/v2/models/tiny/infer", '{"inputs": []}'), ("/v1/predict", '{"text": "the "}')]:
            for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"):
                r = c.post(path, content=body, headers={**bearer(KEY), "content-type": content_type})
                assert r.status_code == 415, (path, content_type, r.text)
        # CORS: only the configured origin, and preflights need no key.
        allowed = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization,content-type"}
        r = c.options("/v1/predict", headers=allowed)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/v1/predict", headers={**allowed, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    ws_url = keyed.replace("http://", "ws://") + "/v1/sessions/stream?model=tiny"
    with pytest.raises(Exception, match="403"):
        connect(ws_url, additional_headers={**bearer(KEY), "Origin": "https://evil.example"}, open_timeout=30)
    for origin in ("https://app.example", keyed):  # the allowed origin, and the service's own page
        with connect(ws_url, additional_headers={**bearer(KEY), "Origin": origin}, open_timeout=30) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "session"


def test_metrics_can_require_a_key(model_repository: Path, start_server: Callable) -> None:
    server = start_server(model_repository, env={"NEXTWORD_API_KEYS": KEY, "NEXTWORD_METRICS_REQUIRE_KEY": "true"})
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=bearer(KEY)).status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def _hits(url: str, key: str, count: int) -> list[httpx.Response]:
    return [httpx.post(f"{url}/v1/predict", json={"text": "the "}, headers=bearer(key)) for _ in range(count)]


def test_rate_limit_per_key(model_repository: Path, start_server: Callable) -> None:
    server = start_server(model_repository, env={"NEXTWORD_API_KEYS": f"{KEY},{OTHER}",
                                                 "NEXTWORD_RATE_LIMIT_PER_SECOND": "0.2",
                                                 "NEXTWORD_RATE_LIMIT_BURST": "3"})
    responses = _hits(server.url, KEY, 4)
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert responses[-1].json()["error"]["type"] == "rate_limited"
    assert 1 <= int(responses[-1].headers["retry-after"]) <= 5
    assert _hits(server.url, OTHER, 1)[0].status_code == 200  # its own bucket
    r = httpx.post(f"{server.url}/openai/v1/completions", json={"model": "tiny", "prompt": "a"}, headers=bearer(KEY))
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"  # OpenAI's shape


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_rate_limit_is_shared_by_replicas_through_redis(model_repository: Path, start_server: Callable,
                                                        tmp_path: Path) -> None:
    redis = RedisServer(tmp_path).start()
    try:
        env = {"NEXTWORD_API_KEYS": KEY, "NEXTWORD_RATE_LIMIT_PER_SECOND": "0.2", "NEXTWORD_RATE_LIMIT_BURST": "4",
               "NEXTWORD_SESSION_STORE": redis.url}
        a, b = start_server(model_repository, env=env), start_server(model_repository, env=env)
        codes = [r.status_code for r in _hits(a.url, KEY, 2) + _hits(b.url, KEY, 2) + _hits(a.url, KEY, 1)]
        assert codes == [200, 200, 200, 200, 429]
    finally:
        redis.stop()
