"""The Redis session store (``NEXTWORD_SESSION_STORE=redis://host:port/db``): shared by replicas.

Layout (all under ``nextword:``):

* ``session:{id}``: hash ``meta`` (compact JSON: model, version, counts, pending fragment, recent
  words, timestamps, TTL, state layout), ``state`` (the lagged state: every state array as raw
  little-endian float32 bytes, concatenated in the card's ``state_names`` order, shapes
  ``[layers, hidden]``; empty for the zero state) and ``last_id``. Every write sets the key's TTL
  (``PEXPIRE``), so Redis itself expires idle sessions.
* ``session-seen:{id}``: ``live``/``expired``/``evicted``, kept for TTL + 1 day: a missing session
  whose marker exists answers ``session_expired``, one never seen ``session_not_found``.
  ``DELETE`` removes both keys.
* ``session-lock:{id}``: the update lock (``SET NX PX`` with a random token; released by a
  compare-and-delete script; a save checks the token, so an update that outlived its lock is
  refused rather than overwriting a newer one).
* ``sessions``: a sorted set of live ids scored by expiry time: the size bound (creating in a
  full store evicts the session closest to expiry), the active-sessions gauge (``ZCARD``) and
  reaping (ids past their expiry whose hash Redis already dropped are counted expired, once,
  whichever replica sees them first).

Every Redis failure (connection refused, timeout) is counted in
``nextword_session_store_errors_total{store="redis",operation}`` and raised as
:class:`SessionStoreUnavailableError` (HTTP 503). The client reconnects by itself, so the service
recovers when Redis is back. Scripts use keys they compute, so the store needs one Redis (or a
primary), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service import metrics
from service.sessions.errors import (
    SessionBusyError,
    SessionConflictError,
    SessionExpiredError,
    SessionNotFoundError,
    SessionStoreUnavailableError,
)
from service.sessions.store import KeyedLocks, SessionRecord

log = logging.getLogger("service.sessions.redis")

T = TypeVar("T")

PREFIX = "nextword:"
SESSION = PREFIX + "session:"
SEEN = PREFIX + "session-seen:"
LOCK = PREFIX + "session-lock:"
INDEX = PREFIX + "sessions"
SEEN_EXTRA_MS = 86_400_000
FORMAT = 1

# KEYS: session, seen, index. ARGV: meta, state, last_id, ttl_ms, seen_ttl_ms, expires_at, id, max_sessions.
# Evicts (by lowest expiry) while the store is full, then writes. Returns {evicted, expired, live}.
_CREATE = f"""
local evicted, expired = 0, 0
local live = redis.call('ZCARD', KEYS[3])
local limit = tonumber(ARGV[8])
while live >= limit do
  local popped = redis.call('ZPOPMIN', KEYS[3])
  if #popped == 0 then break end
  local id = popped[1]
  local seen = '{SEEN}' .. id
  if redis.call('DEL', '{SESSION}' .. id) == 1 then
    evicted = evicted + 1
    redis.call('SET', seen, 'evicted', 'XX', 'KEEPTTL')
  elseif redis.call('GET', seen) == 'live' then
    expired = expired + 1
    redis.call('SET', seen, 'expired', 'XX', 'KEEPTTL')
  end
  live = live - 1
end
redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'state', ARGV[2], 'last_id', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], 'live', 'PX', ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[7])
return {{evicted, expired, live + 1}}
"""

# KEYS: session, seen, lock, index. ARGV: token, meta, state, last_id, ttl_ms, seen_ttl_ms, expires_at, id.
# Returns 1 saved, -1 session gone, -2 lock lost.
_SAVE = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -2 end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'state', ARGV[3], 'last_id', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], 'live', 'PX', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8])
return 1
"""

# KEYS: session, seen, index. ARGV: id. Why a session is missing: nil (never seen or deleted),
# 'expired!' (expired just now: count it), 'expired', 'evicted'; 'live' if it exists after all.
_MISSING = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'live' end
local seen = redis.call('GET', KEYS[2])
if not seen then return false end
redis.call('ZREM', KEYS[3], ARGV[1])
if seen == 'live' then
  redis.call('SET', KEYS[2], 'expired', 'XX', 'KEEPTTL')
  return 'expired!'
end
return seen
"""

# KEYS: session, seen, index. ARGV: id. Returns 1 when a live session was deleted.
_DELETE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return existed
"""

# KEYS: index. ARGV: now, limit. Reaps ids past their expiry whose hash is gone. Returns {expired, live}.
_REAP = f"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local expired = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', '{SESSION}' .. id) == 0 then
    redis.call('ZREM', KEYS[1], id)
    local seen = '{SEEN}' .. id
    if redis.call('GET', seen) == 'live' then
      redis.call('SET', seen, 'expired', 'XX', 'KEEPTTL')
      expired = expired + 1
    end
  end
end
return {{expired, redis.call('ZCARD', KEYS[1])}}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    name = "redis"

    def __init__(
        self,
        url: str,
        max_sessions: int,
        *,
        lock_timeout: float = 5.0,
        lock_lease: float = 30.0,
        timeout: float = 2.0,
        clock=time.time,
    ) -> None:
        self.url = url
        self.max_sessions = max_sessions
        self.lock_timeout = lock_timeout
        self.lock_lease_ms = int(lock_lease * 1000)
        self.timeout = timeout
        self.clock = clock
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._locks = KeyedLocks()
        self._active = metrics.SESSIONS_ACTIVE.labels(self.name)

    # --- plumbing -------------------------------------------------------------------------------

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("the Redis session store is not started")
        return self._client

    async def start(self) -> None:
        # One immediate retry (a pooled connection dropped by a Redis restart reconnects on it),
        # no backoff: with Redis down a call fails fast (503) and a later one reconnects.
        self._client = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=self.timeout, socket_timeout=self.timeout,
            retry=Retry(NoBackoff(), 1), health_check_interval=0, decode_responses=False,
        )
        for name, source in (("create", _CREATE), ("save", _SAVE), ("missing", _MISSING), ("delete", _DELETE),
                             ("reap", _REAP), ("release", _RELEASE)):
            self._scripts[name] = self._client.register_script(source)
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            # Not fatal: stateless endpoints serve without Redis; session calls answer 503 until it is up.
            metrics.SESSION_STORE_ERRORS.labels(self.name, "connect").inc()
            log.warning("session store %s is unreachable at start-up (%s); session calls answer 503 until it is up",
                        _redact(self.url), exc)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _call(self, operation: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            metrics.SESSION_STORE_ERRORS.labels(self.name, operation).inc()
            log.warning("session store %s failed on %s: %s", _redact(self.url), operation, exc)
            raise SessionStoreUnavailableError("redis", f"{type(exc).__name__}: {exc}" if str(exc) else
                                               type(exc).__name__) from None

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        return self._scripts[name](keys=keys, args=args)

    # --- (de)serialisation ----------------------------------------------------------------------

    @staticmethod
    def encode(record: SessionRecord) -> tuple[bytes, bytes, int]:
        names: list[str] = []
        shape: list[int] = []
        if record.state:
            names = list(record.state)
            shape = list(next(iter(record.state.values())).shape)
        meta = {
            "f": FORMAT, "model": record.model, "version": record.version, "created": record.created,
            "last_used": record.last_used, "ttl": record.ttl, "k": record.k, "pending": record.pending,
            "committed": record.committed, "context": record.context, "recent": record.recent_words,
            "state_names": names, "state_shape": shape,
        }
        state = b"" if not record.state else b"".join(
            np.ascontiguousarray(record.state[n], dtype="<f4").tobytes() for n in names
        )
        return json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode(), state, int(record.last_id)

    @staticmethod
    def decode(session_id: str, fields: dict[bytes, bytes]) -> SessionRecord:
        meta = json.loads(fields[b"meta"])
        raw = fields.get(b"state", b"")
        state: dict[str, np.ndarray] | None = None
        names, shape = meta.get("state_names") or [], meta.get("state_shape") or []
        if raw and names and shape:
            size = int(np.prod(shape))
            flat = np.frombuffer(raw, dtype="<f4")
            if flat.size == size * len(names):
                state = {n: flat[i * size:(i + 1) * size].reshape(shape).astype(np.float32)
                         for i, n in enumerate(names)}
            else:  # unreadable: the manager rebuilds the state from the recent words
                state = {}
        return SessionRecord(
            id=session_id, model=meta["model"], version=int(meta["version"]), created=float(meta["created"]),
            last_used=float(meta["last_used"]), ttl=float(meta["ttl"]), k=int(meta.get("k", 5)),
            pending=meta.get("pending", ""), committed=int(meta.get("committed", 0)),
            context=int(meta.get("context", 0)), recent_words=list(meta.get("recent", [])), state=state,
            last_id=int(fields.get(b"last_id", b"0")),
        )

    # --- the store interface --------------------------------------------------------------------

    async def create(self, record: SessionRecord) -> None:
        meta, state, last_id = self.encode(record)
        ttl_ms = max(1, int(record.ttl * 1000))
        sid = record.id
        evicted, expired, live = await self._call("create", self._script(
            "create", [SESSION + sid, SEEN + sid, INDEX],
            [meta, state, last_id, ttl_ms, ttl_ms + SEEN_EXTRA_MS, repr(record.expires_at), sid, self.max_sessions],
        ))
        metrics.SESSIONS_CREATED.labels(self.name).inc()
        if evicted:
            metrics.SESSIONS_EVICTED.labels(self.name).inc(int(evicted))
        if expired:
            metrics.SESSIONS_EXPIRED.labels(self.name).inc(int(expired))
        self._active.set(int(live))

    async def load(self, session_id: str) -> SessionRecord:
        fields = await self._call("load", self.client.hgetall(SESSION + session_id))
        if fields and b"meta" in fields:
            return self.decode(session_id, fields)
        why = await self._call("load", self._script(
            "missing", [SESSION + session_id, SEEN + session_id, INDEX], [session_id]
        ))
        if why is None:
            raise SessionNotFoundError(session_id)
        why = why.decode() if isinstance(why, bytes) else str(why)
        if why == "live":  # written between the two calls (cannot happen to a known id): read again
            return await self.load(session_id)
        if why == "expired!":
            metrics.SESSIONS_EXPIRED.labels(self.name).inc()
            why = "expired"
        raise SessionExpiredError(session_id, why)

    async def save(self, record: SessionRecord, lock: object) -> None:
        meta, state, last_id = self.encode(record)
        ttl_ms = max(1, int(record.ttl * 1000))
        sid = record.id
        saved = await self._call("save", self._script(
            "save", [SESSION + sid, SEEN + sid, LOCK + sid, INDEX],
            [str(lock), meta, state, last_id, ttl_ms, ttl_ms + SEEN_EXTRA_MS, repr(record.expires_at), sid],
        ))
        if saved == -1:
            raise SessionNotFoundError(sid)
        if saved == -2:
            raise SessionConflictError(sid)

    async def delete(self, session_id: str) -> bool:
        existed = await self._call("delete", self._script(
            "delete", [SESSION + session_id, SEEN + session_id, INDEX], [session_id]
        ))
        if existed:
            metrics.SESSIONS_DELETED.labels(self.name).inc()
        return bool(existed)

    @asynccontextmanager
    async def lock(self, session_id: str) -> AsyncIterator[object]:
        """This replica's waiters queue on an asyncio lock; the holder then takes the Redis lock
        (polling with backoff), so replicas serialise too. Both waits share one deadline."""
        start = time.monotonic()
        deadline = start + self.lock_timeout
        async with self._locks.hold(session_id, self.lock_timeout):
            token = secrets.token_hex(16)
            key = LOCK + session_id
            delay = 0.002
            while not await self._call("lock", self.client.set(key, token, nx=True, px=self.lock_lease_ms)):
                if time.monotonic() + delay > deadline:
                    raise SessionBusyError(session_id, round(time.monotonic() - start, 3))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            try:
                yield token
            finally:
                with contextlib.suppress(SessionStoreUnavailableError):  # else the lease expires by itself
                    await self._call("unlock", self._script("release", [key], [token]))

    async def sweep(self) -> None:
        expired, live = await self._call("sweep", self._script("reap", [INDEX], [repr(self.clock()), 1000]))
        if expired:
            metrics.SESSIONS_EXPIRED.labels(self.name).inc(int(expired))
        self._active.set(int(live))


def _redact(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
