"""Section ``sessions``: stateful sessions keep the recurrent state, so a one-word update must cost
the same after 2,000 committed words as after 10, and far less than re-reading the text.

Documented API (``docs/service.md``): ``POST /v1/sessions`` creates a session (its id in the
answer), ``POST /v1/sessions/{id}/text`` with ``{"text": "word "}`` appends text, and the
WebSocket ``/v1/sessions/{id}/stream`` takes ``{"seq": n, "text": ...}`` and answers with the
same ``seq``. ``NEXTWORD_SESSION_STORE=redis://...`` keeps sessions in redis.

Latencies are single-client medians; the two sessions being compared are updated alternately
(each timed update adds one word to both). If the service has no sessions API (yet), the rows say
"not available" instead of failing the run.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import Context, Row, at_least, at_most, log, unavailable
from benchmarks.server import tokens_fed
from benchmarks.texts import WORDS, long_text
from service.config import Settings

_DEFAULT_DELAY_MS = str(Settings.model_fields["max_queue_delay_ms"].default)

TARGET_FLAT, TARGET_VS_STATELESS = 1.25, 20.0
SHORT, LONG = 10, 2000
CHUNK_WORDS = 200


class SessionsUnavailable(Exception):
    pass


class _Client:
    def __init__(self, base_url: str, model: str, version: int) -> None:
        import httpx

        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.base_url = base_url
        self.model, self.version = model, version
        self.created: list[str] = []

    def close(self) -> None:
        for sid in self.created:
            with contextlib.suppress(Exception):  # best-effort cleanup
                self.http.delete(f"/v1/sessions/{sid}")
        self.http.close()

    def create(self) -> str:
        response = self.http.post("/v1/sessions", json={"model": self.model, "version": self.version})
        if response.status_code == 422:  # a create that takes no model fields
            response = self.http.post("/v1/sessions", json={})
        if response.status_code in (404, 405):
            raise SessionsUnavailable(
                f"POST /v1/sessions answers {response.status_code}: the service has no sessions API yet"
            )
        if response.status_code >= 400:
            raise SessionsUnavailable(f"POST /v1/sessions answers {response.status_code}: {response.text[:200]}")
        data = response.json()
        sid = data.get("id") or data.get("session_id") or (data.get("session") or {}).get("id")
        if not sid:
            raise SessionsUnavailable(f"POST /v1/sessions answer has no session id: {str(data)[:200]}")
        self.created.append(str(sid))
        return str(sid)

    def append(self, sid: str, text: str) -> None:
        response = self.http.post(f"/v1/sessions/{sid}/text", json={"text": text})
        if response.status_code >= 400:
            raise SessionsUnavailable(
                f"POST /v1/sessions/{{id}}/text answers {response.status_code}: {response.text[:200]}"
            )

    def commit(self, sid: str, words: list[str]) -> None:
        for i in range(0, len(words), CHUNK_WORDS):
            self.append(sid, " ".join(words[i : i + CHUNK_WORDS]) + " ")


class _Stream:
    """A WebSocket on one session; ``send(text)`` returns when the reply with its seq arrives."""

    def __init__(self, base_url: str, sid: str) -> None:
        from websockets.sync.client import connect

        url = base_url.replace("http://", "ws://", 1) + f"/v1/sessions/{sid}/stream"
        try:
            self.ws = connect(url, open_timeout=10)
        except Exception as exc:  # noqa: BLE001 - websockets raises several types for a refused upgrade
            raise SessionsUnavailable(f"WebSocket {url.split('/v1', 1)[1]} refused: {exc}") from exc
        self.seq = 0

    def send(self, text: str) -> None:
        self.seq += 1
        self.ws.send(json.dumps({"seq": self.seq, "text": text}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("seq") == self.seq:
                if "error" in reply:
                    raise SessionsUnavailable(f"WebSocket update failed: {str(reply['error'])[:200]}")
                return

    def close(self) -> None:
        self.ws.close()


def _alternate(
    fns: dict[str, Callable[[str], None]], n: int, warmup: int = 3, tokens: Callable[[], float] | None = None
) -> dict[str, float]:
    """Median ms of ``n`` calls of each function, alternating; each call appends the next passage
    word. With ``tokens`` (a counter of tokens the model read), ``"tokens"`` is the count per timed call."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    before = 0.0
    for i in range(warmup + n):
        if i == warmup and tokens is not None:
            before = tokens()
        word = WORDS[i % len(WORDS)] + " "
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(word)
            if i >= warmup:
                samples[name].append(time.perf_counter() - start)
    out = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    if tokens is not None:
        out["tokens"] = (tokens() - before) / (n * len(fns))
    return out


def _stateless_ms(client: _Client, text: str, n: int) -> float:
    body = json.dumps({"text": text, "k": 5, "model": client.model, "version": client.version}).encode()
    headers = {"content-type": "application/json"}
    times = []
    for i in range(n + 2):
        start = time.perf_counter()
        client.http.post("/v1/predict", content=body, headers=headers).raise_for_status()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _pair_rows(
    transport: str, short_ms: float, long_ms: float, stateless_ms: float, tokens: float, delay_ms: float
) -> list[Row]:
    """``tokens``: tokens the model read per timed update (from ``nextword_tokens_total``);
    ``delay_ms``: the batcher's wait for companions, which a lone update pays in full."""
    flat = long_ms / short_ms
    speedup = stateless_ms / long_ms
    fed = f"the model read {tokens:.1f} tokens per update"
    rereads = (
        f"{fed}: the update re-reads committed text"
        if tokens > 10
        else f"{fed} (the state is reused), so the difference is not model work: store/serialisation or noise"
    )
    return [
        Row(
            "sessions", f"{transport} one-word update after {SHORT} words", short_ms, "ms", display=f"{short_ms:.2f} ms"
        ),
        Row(
            "sessions", f"{transport} one-word update after {LONG:,} words", long_ms, "ms", display=f"{long_ms:.2f} ms"
        ),
        Row(
            "sessions",
            f"{transport} update cost, {LONG:,} vs {SHORT} words",
            flat,
            "×",
            target=f"≤ {TARGET_FLAT:g}×",
            met=at_most(flat, TARGET_FLAT),
            display=f"{flat:.2f}×",
            note="" if flat <= TARGET_FLAT else rereads,
        ),
        Row(
            "sessions",
            f"stateless /v1/predict on {LONG:,} words vs {transport} session update",
            speedup,
            "×",
            target=f"≥ {TARGET_VS_STATELESS:g}×",
            met=at_least(speedup, TARGET_VS_STATELESS),
            display=f"{speedup:.1f}× ({stateless_ms:.1f} vs {long_ms:.2f} ms)",
            note=""
            if speedup >= TARGET_VS_STATELESS
            else f"{fed}; the update's fixed cost dominates: the batcher's {delay_ms:g} ms wait for companions "
            "(NEXTWORD_MAX_QUEUE_DELAY_MS), framing, JSON, the store and top-k over V",
        ),
    ]


def run_sessions(ctx: Context) -> list[Row]:
    card = ctx.card
    service = ctx.servers.service("default")
    n = ctx.pick(60, 10)
    rows: list[Row] = []
    client = _Client(service.url, card.name, card.version)

    def fed() -> float:
        return tokens_fed(service.url, card.name)

    delay = float(service.env.get("NEXTWORD_MAX_QUEUE_DELAY_MS", _DEFAULT_DELAY_MS))
    words_long = long_text(LONG).split()
    words_short = words_long[:SHORT]
    try:
        try:
            log("sessions: HTTP updates (in-memory store)")
            short, long = client.create(), client.create()
            client.commit(short, words_short)
            client.commit(long, words_long)
            http = _alternate(
                {"short": lambda w: client.append(short, w), "long": lambda w: client.append(long, w)}, n, tokens=fed
            )
            stateless = _stateless_ms(client, long_text(LONG), ctx.pick(10, 2))
            rows += _pair_rows("HTTP", http["short"], http["long"], stateless, http["tokens"], delay)
            ctx.shared["sessions_http_long_ms"] = http["long"]
        except SessionsUnavailable as exc:
            rows += _unavailable_pair("HTTP", str(exc))
            stateless = None
        try:
            log("sessions: WebSocket updates")
            short, long = client.create(), client.create()
            client.commit(short, words_short)
            client.commit(long, words_long)
            streams = {"short": _Stream(service.url, short), "long": _Stream(service.url, long)}
            try:
                ws = _alternate({k: s.send for k, s in streams.items()}, n, tokens=fed)
            finally:
                for s in streams.values():
                    s.close()
            if stateless is None:
                stateless = _stateless_ms(client, long_text(LONG), ctx.pick(10, 2))
            rows += _pair_rows("WebSocket", ws["short"], ws["long"], stateless, ws["tokens"], delay)
        except SessionsUnavailable as exc:
            rows += _unavailable_pair("WebSocket", str(exc))
        rows.append(_redis_row(ctx, client, words_long, n))
    finally:
        client.close()
    return rows


def _unavailable_pair(transport: str, why: str) -> list[Row]:
    """The two target rows of one transport, when its sessions could not be measured."""
    return [
        unavailable("sessions", f"{transport} one-word update, {LONG:,} vs {SHORT} words", why, f"≤ {TARGET_FLAT:g}×"),
        unavailable("sessions", f"stateless /v1/predict on {LONG:,} words vs {transport} session update", why,
                    f"≥ {TARGET_VS_STATELESS:g}×"),
    ]


def _redis_row(ctx: Context, memory: _Client, words_long: list[str], n: int) -> Row:
    name = f"HTTP one-word update after {LONG:,} words, redis vs in-memory store"
    try:
        redis = ctx.servers.redis()
    except RuntimeError as exc:
        return unavailable("sessions", name, str(exc))
    card = ctx.card
    try:
        service = ctx.servers.service("redis", {"NEXTWORD_SESSION_STORE": redis.url})
    except RuntimeError as exc:
        return unavailable("sessions", name, f"the service did not start with a redis store: {str(exc)[:300]}")
    client = _Client(service.url, card.name, card.version)
    try:
        log("sessions: redis store vs in-memory")
        mem_sid, redis_sid = memory.create(), client.create()
        memory.commit(mem_sid, words_long)
        client.commit(redis_sid, words_long)
        t = _alternate(
            {"memory": lambda w: memory.append(mem_sid, w), "redis": lambda w: client.append(redis_sid, w)}, n
        )
    except SessionsUnavailable as exc:
        return unavailable("sessions", name, str(exc))
    finally:
        client.close()
        ctx.servers.release("redis")
    ratio = t["redis"] / t["memory"]
    details: dict[str, Any] = {"redis_ms": t["redis"], "memory_ms": t["memory"], "store": redis.url}
    return Row(
        "sessions",
        name,
        ratio,
        "×",
        display=f"{ratio:.2f}× ({t['redis']:.2f} vs {t['memory']:.2f} ms)",
        details=details,
    )
