"""KServe v2 / Open Inference Protocol (``/v2``) with the real ``tritonclient.http`` against uvicorn:
health, metadata, readiness, inference with binary and JSON tensors, versions, errors; plus raw
HTTP checks of shapes, datatypes and the ``{"error": "..."}`` body."""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

from nextword.text import split_text

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TEXTS = ["the quick brown ", "I saw the qu", "", "Mr. Smith of the U.S", "café au "]


@pytest.fixture(scope="module")
def triton(live_server: str) -> httpclient.InferenceServerClient:
    client = httpclient.InferenceServerClient(url=live_server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def text_input(texts: list[str], binary: bool = True, column: bool = False) -> httpclient.InferInput:
    data = np.array(texts, dtype=object)
    if column:
        data = data.reshape(-1, 1)
    tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def expected(reference, texts: list[str], k: int, version: int = 2) -> tuple[list[list[str]], np.ndarray]:
    words, probs = [], np.zeros((len(texts), k), np.float32)
    for i, text in enumerate(texts):
        split = split_text(text)
        top = reference.top_words("tiny", version, split.context, k, split.prefix)
        words.append([w for w, _ in top] + [""] * (k - len(top)))
        probs[i, : len(top)] = [p for _, p in top]
    return words, probs


def test_health_and_metadata(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tiny") and triton.is_model_ready("tiny", "1") and triton.is_model_ready("tinygru")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("tiny", "7")
    server = triton.get_server_metadata()
    assert server["name"] == "nextword" and {"binary_tensor_data", "sequence"} <= set(server["extensions"])
    meta = triton.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["2", "1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "words": ("BYTES", [-1, -1]), "probabilities": ("FP32", [-1, -1]), "display": ("BYTES", [-1, -1]),
        "correction": ("BOOL", [-1, -1])}
    assert triton.get_model_metadata("tiny", "1")["versions"] == ["1"]
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert "nope" in info.value.message() and info.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_reference(triton: httpclient.InferenceServerClient, reference, binary: bool) -> None:
    outputs = None if binary else [httpclient.InferRequestedOutput("words", binary_data=False),
                                   httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    result = triton.infer("tiny", [text_input(TEXTS, binary)], outputs=outputs, parameters={"k": 3},
                          request_id="req-1")
    words = result.as_numpy("words")
    probs = result.as_numpy("probabilities")
    assert words.shape == (len(TEXTS), 3) and probs.shape == (len(TEXTS), 3) and probs.dtype == np.float32
    exp_words, exp_probs = expected(reference, TEXTS, 3)
    got = [[w.decode() if isinstance(w, bytes) else w for w in row] for row in words.tolist()]
    assert got == exp_words
    np.testing.assert_allclose(probs, exp_probs, rtol=1e-5, atol=1e-7)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("tiny", "2", "req-1")


def test_infer_column_shape_version_and_output_choice(triton: httpclient.InferenceServerClient, reference) -> None:
    texts = ["the cat ", "the qu"]
    result = triton.infer("tiny", [text_input(texts, binary=False, column=True)], model_version="1",
                          outputs=[httpclient.InferRequestedOutput("probabilities")])
    assert result.as_numpy("words") is None
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 5)  # default k
    np.testing.assert_allclose(probs, expected(reference, texts, 5, version=1)[1], rtol=1e-5, atol=1e-7)
    assert result.get_response()["model_version"] == "1"


def test_infer_errors(triton: httpclient.InferenceServerClient) -> None:
    def fails(**kwargs: object) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as info:
            triton.infer(**kwargs)  # type: ignore[arg-type]
        return info.value

    assert fails(model_name="nope", inputs=[text_input(["the "])]).status() == "404"
    assert fails(model_name="tiny", inputs=[text_input(["the "])], model_version="9").status() == "404"
    err = fails(model_name="tiny", inputs=[text_input(["the "])], parameters={"k": 0})
    assert err.status() == "400" and "k" in err.message()
    numbers = httpclient.InferInput("text", [2], "INT64")
    numbers.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
    err = fails(model_name="tiny", inputs=[numbers])
    assert err.status() == "400" and "BYTES" in err.message()
    err = fails(model_name="tiny", inputs=[text_input(["the ", "a "])], sequence_id=42, sequence_start=True)
    assert err.status() == "400" and "exactly one text" in err.message()
    err = fails(model_name="tiny", inputs=[text_input(["the "])], sequence_id=987654321)
    assert err.status() == "400" and "not active" in err.message()


def test_sequences_carry_state_like_sessions(triton: httpclient.InferenceServerClient, reference) -> None:
    """Triton's sequence extension: each request sends only the new text; the answer is the one for
    the whole text so far. Two interleaved sequences (an integer id and a string id) stay apart."""

    def step(seq: int | str, delta: str, **flags: bool) -> list[str]:
        # The reference has no typo corrections: compare the model's own ranking.
        result = triton.infer("tiny", [text_input([delta])], parameters={"k": 3, "corrections": False},
                              sequence_id=seq, **flags)
        return [w.decode() for w in result.as_numpy("words")[0]]

    a, b = ["the quick ", "brown ", "fo"], ["I saw ", "the ", "qu"]
    assert step(7, a[0], sequence_start=True) == expected(reference, [a[0]], 3)[0][0]
    assert step("user-7", b[0], sequence_start=True) == expected(reference, [b[0]], 3)[0][0]
    for i in (1, 2):
        assert step(7, a[i]) == expected(reference, ["".join(a[: i + 1])], 3)[0][0]
        assert step("user-7", b[i]) == expected(reference, ["".join(b[: i + 1])], 3)[0][0]
    assert step(7, "x ", sequence_end=True) == expected(reference, ["".join(a) + "x "], 3)[0][0]
    with pytest.raises(InferenceServerException) as info:
        step(7, "more ")  # ended
    assert info.value.status() == "400" and "not active" in info.value.message()
    assert step(7, "the ", sequence_start=True) == expected(reference, ["the "], 3)[0][0]  # a fresh start
    assert step("user-7", "again ", sequence_start=True, sequence_end=True) == expected(reference, ["again "], 3)[0][0]


def test_sequence_parameters_are_checked(live_server: str) -> None:
    url = f"{live_server}/v2/models/tiny/infer"
    text = [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["the "]}]
    for params, needle in (({"sequence_id": -1}, "sequence_id"), ({"sequence_id": True}, "sequence_id"),
                           ({"sequence_id": "x" * 300}, "sequence_id"),
                           ({"sequence_id": 3, "sequence_start": "yes"}, "sequence_start"),
                           ({"sequence_end": True}, "need a sequence_id")):
        response = httpx.post(url, json={"inputs": text, "parameters": params})
        assert response.status_code == 400 and needle in response.json()["error"], (params, response.text)


def test_raw_json_protocol(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["the ", "a "]}],
                "parameters": {"k": 2}}
        r = client.post("/v2/models/tinygru/infer", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        data = r.json()
        assert data["model_name"] == "tinygru" and data["model_version"] == "1"
        outs = {o["name"]: o for o in data["outputs"]}
        assert outs["words"]["shape"] == [2, 2] and outs["words"]["datatype"] == "BYTES"
        assert len(outs["words"]["data"]) == 4 and all(isinstance(w, str) for w in outs["words"]["data"])
        assert outs["probabilities"]["datatype"] == "FP32" and len(outs["probabilities"]["data"]) == 4
        for bad, fragment in [
            ({"inputs": []}, "inputs"),
            ({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}, "elements"),
            ({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}, "shape"),
            ({**body, "outputs": [{"name": "logits"}]}, "logits"),
        ]:
            r = client.post("/v2/models/tiny/infer", json=bad)
            assert r.status_code == 400 and set(r.json()) == {"error"} and fragment in r.json()["error"], bad
        r = client.post("/v2/models/tiny/infer", content=b"\xff\xfe not json")
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        r = client.get("/v2/models/nope")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        r = client.get("/v2/repository/index")  # not implemented: still the protocol's error shape
        assert r.status_code in (404, 405) and isinstance(r.json()["error"], str)


def test_raw_binary_round_trip(live_server: str) -> None:
    """The binary tensor extension by hand: a header of Inference-Header-Content-Length bytes, then
    length-prefixed UTF-8 texts; binary outputs come back the same way."""
    texts = ["naïve ", "the "]
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps({
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"k": 2, "binary_data_output": True},
    }).encode()
    r = httpx.post(f"{live_server}/v2/models/tiny/infer", content=header + raw, timeout=60,
                   headers={"Inference-Header-Content-Length": str(len(header)),
                            "Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    size = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:size])
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    assert [o["name"] for o in meta["outputs"]] == ["words", "probabilities"]
    assert len(r.content) == size + sum(sizes) and sizes[1] == 2 * 2 * 4
    probs = np.frombuffer(r.content[size + sizes[0]:], dtype="<f4").reshape(2, 2)
    assert np.all(probs > 0) and np.all(probs[:, 0] >= probs[:, 1])


def test_sequence_sessions_cannot_be_derived_by_others(live_server: str) -> None:
    """The session behind a sequence was ``kserve-`` + sha256 of the model name and sequence id:
    anyone could compute it, read the sequence's pending text and delete it. Now it is an HMAC
    under the server's secret."""
    import hashlib

    import httpx

    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["private words ty"]}],
            "parameters": {"sequence_id": 31337, "sequence_start": True}}
    assert httpx.post(f"{live_server}/v2/models/tiny/infer", json=body).status_code == 200
    guessed = "kserve-" + hashlib.sha256(b"tiny\0int\0" + b"31337").hexdigest()[:40]
    assert httpx.get(f"{live_server}/v1/sessions/{guessed}").status_code == 404
    assert httpx.delete(f"{live_server}/v1/sessions/{guessed}").status_code == 404
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["pe "]}],
            "parameters": {"sequence_id": 31337, "sequence_end": True}}
    assert httpx.post(f"{live_server}/v2/models/tiny/infer", json=body).status_code == 200  # still its own


def test_sequence_ids_follow_the_configured_secret(model_repository, service_settings) -> None:
    import asyncio

    from service.engine import Engine
    from service.sessions import SessionManager

    async def derive(secret: str | None) -> str:
        settings = service_settings(model_repository, session_secret=secret)
        manager = SessionManager(Engine.__new__(Engine), settings)
        await manager.start()
        try:
            return await manager.derived_id("kserve-", "tiny", "int", "7")
        finally:
            await manager.close()

    a, b, c = (asyncio.run(derive(s)) for s in ("one secret", "one secret", "another"))
    assert a == b != c and len(a) == len("kserve-") + 40
    assert asyncio.run(derive(None)) != asyncio.run(derive(None))  # memory store: a random key per process


def test_infer_without_a_version_survives_a_swap_after_the_lookup(repository_copy, service_settings,
                                                                  reference) -> None:
    """The newest version is looked up (for the 404 of an unknown model), then unloaded before the
    work is submitted: the request runs on its successor instead of failing with version_not_found;
    a request that names the unloaded version still gets its 404."""
    import shutil

    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(service_settings(repository_copy))) as client:
        repository = client.app.state.engine.repository
        resolve = repository.resolve
        calls = {"n": 0}

        def swap_after_first_lookup(name=None, version=None):
            found = resolve(name, version)
            calls["n"] += 1
            if calls["n"] == 1 and found.version == 2:
                shutil.rmtree(repository_copy / "tiny" / "2")
                assert repository.scan(True).unloaded == [("tiny", 2)]
            return found

        repository.resolve = swap_after_first_lookup
        body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}],
                "parameters": {"k": 3}}
        r = client.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1"  # the version that answered
        words, _ = expected(reference, TEXTS[:2], 3, version=1)
        assert r.json()["outputs"][0]["data"] == [w for row in words for w in row]
        assert client.post("/v2/models/tiny/versions/2/infer", json=body).status_code == 404
