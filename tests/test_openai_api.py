"""The OpenAI-compatible API (``/openai/v1``) with the real ``openai`` client against uvicorn: models,
completions (greedy, seeded sampling, n, best_of, logprobs, echo, stop, list prompts), streaming,
OpenAI-shaped errors; plus the raw SSE framing (``data: {json}`` ... ``data: [DONE]``)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/openai/v1", api_key="unused", timeout=60, max_retries=0)


def native_greedy(live_server: str, prompt: str, model: str, max_words: int) -> str:
    r = httpx.post(f"{live_server}/v1/generate", json={"prompt": prompt, "model": model, "max_words": max_words},
                   timeout=60)
    return r.json()["completions"][0]["text"]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["tiny", "tiny:2", "tiny:1", "tinygru", "tinygru:1"]
    assert all(m.object == "model" and m.owned_by == "nextword" and m.created > 0 for m in models.data)
    assert client.models.retrieve("tiny:1").id == "tiny:1"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.body["code"] == "model_not_found"


def test_greedy_completion(client: openai.OpenAI, live_server: str) -> None:
    prompt = "The quick brown "
    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    assert c.object == "text_completion" and c.id.startswith("cmpl-") and c.model == "tiny:2"
    (choice,) = c.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert choice.text == native_greedy(live_server, prompt, "tiny", 6)
    assert c.usage.prompt_tokens == 3
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    words = len(choice.text.split())
    assert c.usage.completion_tokens >= words and (choice.finish_reason == "stop" or c.usage.completion_tokens == 6)


def test_version_pinned_model_id(client: openai.OpenAI, live_server: str) -> None:
    c = client.completions.create(model="tiny:1", prompt="the cat ", max_tokens=4, temperature=0)
    assert c.model == "tiny:1"
    r = httpx.post(f"{live_server}/v1/generate", json={"prompt": "the cat ", "model": "tiny", "version": 1,
                                                       "max_words": 4}, timeout=60)
    assert c.choices[0].text == r.json()["completions"][0]["text"]


def test_seeded_sampling_reproduces(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "the ", "max_tokens": 8, "temperature": 1.3, "top_p": 0.9, "n": 3}
    a = client.completions.create(seed=5, **kwargs)
    b = client.completions.create(seed=5, **kwargs)
    c = client.completions.create(seed=6, **kwargs)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert [x.text for x in a.choices] != [x.text for x in c.choices]


def test_list_prompts_best_of_and_echo(client: openai.OpenAI) -> None:
    prompts = ["the cat ", "she said that th"]
    c = client.completions.create(model="tinygru", prompt=prompts, max_tokens=3, n=2, best_of=4, seed=1, echo=True)
    assert [x.index for x in c.choices] == [0, 1, 2, 3]
    for x in c.choices:
        assert x.text.startswith(prompts[x.index // 2])
    # The word being typed is completed: "th" grows into a word.
    assert c.choices[2].text[len("she said that th"):][:1].isalpha() or c.choices[2].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    prompt = "I saw the qu"
    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    (choice,) = c.choices
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == len(prompt)
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(token_lp)
        assert token_lp == pytest.approx(max(top.values()))  # greedy picks the best alternative
    # Echo + logprobs: the prompt's words first (their alternatives are not computed: null).
    e = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, logprobs=1, echo=True)
    elp = e.choices[0].logprobs
    assert e.choices[0].text.startswith(prompt)
    assert "".join(elp.tokens) == e.choices[0].text
    assert elp.top_logprobs[0] is None and elp.text_offset[0] == 0


def test_stop_sequences(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="the cat ", max_tokens=8, temperature=0).choices[0]
    needle = full.text.split()[2]
    cut = client.completions.create(model="tiny", prompt="the cat ", max_tokens=8, temperature=0,
                                    stop=[needle, "zzz"]).choices[0]
    assert cut.text == full.text[: full.text.find(needle)] and cut.finish_reason == "stop"


def test_max_tokens_zero_with_echo(client: openai.OpenAI) -> None:
    c = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=0, echo=True)
    assert c.choices[0].text == "the cat sat" and c.choices[0].finish_reason == "length"


def test_streaming(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "the quick ", "max_tokens": 6, "temperature": 0.9, "seed": 3, "n": 2}
    whole = client.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    finish = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        assert chunk.object == "text_completion" and chunk.model == "tiny:2"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {x.index: x.text for x in whole.choices}
    assert finish == {x.index: x.finish_reason for x in whole.choices}
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_sse_framing(live_server: str) -> None:
    body = {"model": "tiny", "prompt": "the ", "max_tokens": 3, "stream": True, "logprobs": 1}
    with httpx.stream("POST", f"{live_server}/openai/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    chunks = []
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block
        chunks.append(json.loads(block[len("data: "):]))
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    words = [c for c in chunks if c["choices"][0]["finish_reason"] is None]
    assert all(c["choices"][0]["logprobs"]["tokens"] == [c["choices"][0]["text"]] for c in words)


def test_errors_have_openai_shape(client: openai.OpenAI, live_server: str) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="nope", prompt="x")
    assert nf.value.status_code == 404 and nf.value.body["param"] == "model"
    cases = [
        ({"n": 9}, "n"), ({"logprobs": 6}, "logprobs"), ({"max_tokens": 10_000}, "max_tokens"),
        ({"suffix": "x"}, "suffix"), ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"best_of": 2, "stream": True}, "best_of"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": [1, 2, 3]}, "prompt"), ({"temperature": 3}, "temperature"),
    ]
    for extra, param in cases:
        kwargs = {"model": "tiny", "prompt": "the ", **extra}
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**kwargs)
        assert info.value.status_code == 400
        assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == param, extra
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model="tiny", prompt="x", extra_body={"foo": 1})
    assert "Unrecognized request argument supplied: foo" in unknown.value.message
    r = httpx.post(f"{live_server}/openai/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{live_server}/openai/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
