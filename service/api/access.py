"""Access control, off by default: API keys, per-key rate limits, cross-site request checks.

* **API keys** (``NEXTWORD_API_KEYS`` comma-separated, and/or ``NEXTWORD_API_KEYS_FILE`` one per
  line): every HTTP route and WebSocket then needs ``Authorization: Bearer <key>`` (the OpenAI
  client's ``api_key`` sends exactly that; tritonclient sends it with ``headers=``), except the
  probes ``/healthz`` and ``/readyz``, ``/metrics`` (unless ``NEXTWORD_METRICS_REQUIRE_KEY``), and
  the keyboard page's static files (``/``, ``/static/``; they hold no data, and its WebSocket
  still needs a key). A missing or unknown key is a 401 in the front end's error shape; a refused
  WebSocket handshake is an HTTP 403. Keys are compared as SHA-256 digests with
  ``hmac.compare_digest`` against every configured key, so timing says nothing about a key.
* **Admin keys** (``NEXTWORD_ADMIN_API_KEYS``): only they may ``POST /v1/models/reload`` while keys
  are on (403 for other keys; with no admin key configured, nobody may: the repository poller
  still loads new versions).
* **Who a request is** (:func:`principal`): a short digest of its key, so sessions belong to the
  key that created them and rate limits count per key; without keys, every client is ``""``.
* **Rate limits** (``NEXTWORD_RATE_LIMIT_PER_SECOND`` > 0): a token bucket per key (per client
  address without keys) of ``NEXTWORD_RATE_LIMIT_BURST`` requests; an empty bucket answers 429
  with ``Retry-After``. With a Redis session store the buckets live in Redis, shared by every
  replica; if Redis fails, requests are let through (the limiter never takes the service down).
* **Cross-site requests**: a POST/PUT/PATCH/DELETE whose ``Content-Type`` a browser form can send
  without a CORS preflight (``text/plain``, form encodings) is refused with 415, so another site
  cannot make a visitor's browser post to the API; a WebSocket handshake whose ``Origin`` is
  neither this host nor in ``NEXTWORD_CORS_ALLOWED_ORIGINS`` is refused (403); the CORS policy
  itself (Starlette's middleware) allows only those origins, none by default.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import ErrorInfo, api_style, render_error
from service.config import Settings

log = logging.getLogger("service.access")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
ADMIN_PATHS = frozenset({"/v1/models/reload"})
SIMPLE_CONTENT_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
PRINCIPAL = "nextword_principal"  # key of the request's identity in the ASGI scope's state


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load_keys(settings: Settings) -> tuple[list[bytes], list[bytes]]:
    """SHA-256 digests of the API keys and of the admin keys (admin keys are API keys too)."""
    keys: list[str] = []
    if settings.api_keys is not None:
        keys += settings.api_keys.get_secret_value().split(",")
    if settings.api_keys_file is not None:
        lines = settings.api_keys_file.read_text(encoding="utf-8").splitlines()
        keys += [line for line in lines if not line.lstrip().startswith("#")]
    admin: list[str] = []
    if settings.admin_api_keys is not None:
        admin = settings.admin_api_keys.get_secret_value().split(",")
    clean = [k.strip() for k in keys if k.strip()]
    admin_clean = [k.strip() for k in admin if k.strip()]
    return [_digest(k) for k in dict.fromkeys(clean + admin_clean)], [_digest(k) for k in admin_clean]


def _match(digest: bytes, candidates: list[bytes]) -> bool:
    found = False
    for candidate in candidates:  # no early exit: the time does not depend on which key matched
        found |= hmac.compare_digest(digest, candidate)
    return found


def principal(scope: Scope) -> str:
    """The identity of a request: a digest of its API key, or ``""`` without access control."""
    return scope.get("state", {}).get(PRINCIPAL, "")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def same_origin_or_allowed(scope: Scope, allowed: frozenset[str]) -> bool:
    """A WebSocket handshake's ``Origin`` is this host, or one of the allowed origins (no Origin:
    not a browser, so not a cross-site request)."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    host = _header(scope, b"host")
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


@dataclass
class _Bucket:
    tokens: float
    stamp: float


# KEYS: bucket. ARGV: rate per second, burst, now (s). Takes one token; returns the seconds to wait
# ("0" when one was taken).
_TAKE = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 't', 's')
local tokens, stamp = tonumber(v[1]) or burst, tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RateLimiter:
    """Token buckets per identity: in this process, or in Redis when a Redis client is given."""

    def __init__(self, rate: float, burst: int, clock: Any = time.time) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._script: Any = None

    def use_redis(self, client: Any) -> None:
        self._script = client.register_script(_TAKE)

    async def wait_for(self, identity: str) -> float:
        """Take a token for ``identity``: 0 when allowed, else the seconds until one is free."""
        now = self.clock()
        if self._script is not None:
            try:
                key = "nextword:ratelimit:" + hashlib.sha256(identity.encode()).hexdigest()[:32]
                return float(await self._script(keys=[key], args=[self.rate, self.burst, repr(now)]))
            except Exception as exc:  # Redis down: let requests through rather than refuse them all
                log.warning("rate limiter: Redis failed (%s); request allowed", type(exc).__name__)
                return 0.0
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) > 100_000:  # bounded: forget full (idle) buckets
                self._buckets = {k: b for k, b in self._buckets.items()
                                 if b.tokens + (now - b.stamp) * self.rate < self.burst}
            bucket = self._buckets[identity] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate


class AccessControl:
    """Pure ASGI middleware applying the policy above to every HTTP request and WebSocket."""

    def __init__(self, app: ASGIApp, settings: Settings, limiter: RateLimiter | None = None) -> None:
        self.app = app
        self.settings = settings
        self.keys, self.admin_keys = load_keys(settings)
        self.allowed_origins = frozenset(settings.cors_origins)
        self.limiter = limiter

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        try:
            if kind == "websocket" and not same_origin_or_allowed(scope, self.allowed_origins):
                raise _Refused(403, "forbidden_origin", "this Origin may not open WebSockets here "
                               "(NEXTWORD_CORS_ALLOWED_ORIGINS)")
            if kind == "http" and scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
                content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
                if content_type in SIMPLE_CONTENT_TYPES:
                    raise _Refused(415, "unsupported_media_type", f"Content-Type {content_type} is not accepted "
                                   "(a browser form may send it cross-site); send application/json")
            identity = self._authenticate(scope, path)
            scope.setdefault("state", {})[PRINCIPAL] = identity
            if self.limiter is not None and not self._open(path):
                wait = await self.limiter.wait_for(identity or "addr:" + str((scope.get("client") or ("",))[0]))
                if wait > 0:
                    raise _Refused(429, "rate_limited", "too many requests for this API key; retry later",
                                   {"Retry-After": str(max(1, math.ceil(wait)))})
        except _Refused as refused:
            await self._refuse(scope, receive, send, refused)
            return
        await self.app(scope, receive, send)

    def _open(self, path: str) -> bool:
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        return path == "/metrics" and not self.settings.metrics_require_key

    def _authenticate(self, scope: Scope, path: str) -> str:
        if not self.enabled or self._open(path):
            return ""
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _Refused(401, "unauthorized", "an API key is required: send Authorization: Bearer <key>",
                           {"WWW-Authenticate": "Bearer"})
        digest = _digest(token)
        if not _match(digest, self.keys):
            raise _Refused(401, "unauthorized", "the API key is not valid", {"WWW-Authenticate": "Bearer"})
        if path in ADMIN_PATHS and not _match(digest, self.admin_keys):
            raise _Refused(403, "forbidden", "this operation needs an admin key (NEXTWORD_ADMIN_API_KEYS)")
        return digest.hex()[:32]

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, refused: _Refused) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": refused.type})
            return
        info = ErrorInfo(refused.status, refused.type, refused.message, headers=refused.headers)
        await render_error(api_style(scope.get("path", "")), info)(scope, receive, send)


class _Refused(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers
