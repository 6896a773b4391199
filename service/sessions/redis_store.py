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
* ``session-lock:{id}``: the update lock (``SET NX PX`` with a random token and a short lease,
  renewed by the holder while its update runs, so a replica that dies mid-update blocks the
  session for at most one lease; released by a compare-and-delete script; a save checks the
  token, so an update that outlived its lock is refused rather than overwriting a newer one).
* ``sessions``: a sorted set of live ids scored by expiry time: the size bound (creating in a
  full store evicts the session closest to expiry), the active-sessions gauge (``ZCARD``) and
  reaping (ids past their expiry whose hash Redis already dropped are counted expired, once,
  whichever replica sees them first).

Every Redis failure (connection refused, timeout) is counted in
``nextword_session_store_errors_total{store="redis",operation}`` and raised as
:class:`SessionStoreUnavailableError` (HTTP 503). The client reconnects by itself, so the service
recovers when Redis is back.

On Redis Cluster (``service/sessions/redis_cluster.py``) every key above also carries its
session's bucket tag (``{sNNN}``, after the prefix) and the sorted set is one per bucket, so each
script's keys share one slot; the scripts, given the tag, are the same.
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
from typing import Any, NamedTuple, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

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
SECRET = PREFIX + "session-secret"
SEEN_EXTRA_MS = 86_400_000
FORMAT = 1

# KEYS: session, seen, index. ARGV: meta, state, last_id, ttl_ms, seen_ttl_ms, expires_at, id, max_sessions, tag.
# Evicts (by lowest expiry) while the store is full, then writes. Returns {evicted, expired, live}.
_CREATE = f"""
local evicted, expired = 0, 0
local live = redis.call('ZCARD', KEYS[3])
local limit = tonumber(ARGV[8])
while live >= limit do
  local popped = redis.call('ZPOPMIN', KEYS[3])
  if #popped == 0 then break end
  local id = popped[1]
  local seen = '{SEEN}' .. ARGV[9] .. id
  if redis.call('DEL', '{SESSION}' .. ARGV[9] .. id) == 1 then
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

# KEYS: index. ARGV: now, limit, tag. Reaps ids past their expiry whose hash is gone. Returns {expired, live}.
_REAP = f"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local expired = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', '{SESSION}' .. ARGV[3] .. id) == 0 then
    redis.call('ZREM', KEYS[1], id)
    local seen = '{SEEN}' .. ARGV[3] .. id
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

# KEYS: lock. ARGV: token, lease_ms. Extends a lock this holder still owns; 0 when it was lost.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


# Everything a Redis client may raise for an unreachable or failing store; RedisClusterException
# (e.g. no node answers for a slot) does not derive from RedisError.
STORE_ERRORS = (RedisError, RedisClusterException, OSError)


class Keys(NamedTuple):
    """The keys of one session. ``tag`` is the hash tag they share ("" on one Redis)."""

    session: str
    seen: str
    lock: str
    index: str
    tag: str


class RedisStore:
    """The store on one Redis (or primary). :class:`RedisClusterStore` is the same store on Redis
    Cluster: only the key names (:meth:`tag`) and the client differ."""

    name = "redis"
    # Sweeps reap at most this many index buckets each (one Redis has one bucket).
    sweep_buckets = 64

    def __init__(
        self,
        url: str,
        max_sessions: int,
        *,
        lock_timeout: float = 5.0,
        lock_lease: float = 1.5,
        timeout: float = 2.0,
        clock=time.time,
    ) -> None:
        self.url = url
        self.max_sessions = max_sessions
        self.lock_timeout = lock_timeout
        self.lock_lease = lock_lease
        self.lock_lease_ms = max(1, int(lock_lease * 1000))
        self.timeout = timeout
        self.clock = clock
        self._client: aioredis.Redis | None = None
        self._secret: bytes | None = None
        self._scripts: dict[str, Any] = {}
        self._locks = KeyedLocks()
        self._active = metrics.SESSIONS_ACTIVE.labels(self.name)
        self._live: dict[str, int] = {}  # live sessions per index bucket, as last seen
        self._next_bucket = 0

    # --- keys -----------------------------------------------------------------------------------

    def tag(self, session_id: str) -> str:
        """What Redis Cluster would hash in a session's keys: nothing on one Redis."""
        return ""

    def buckets(self) -> list[str]:
        """The tags of all index buckets."""
        return [""]

    def keys(self, session_id: str) -> Keys:
        tag = self.tag(session_id)
        return Keys(SESSION + tag + session_id, SEEN + tag + session_id, LOCK + tag + session_id,
                    self.index_key(tag), tag)

    # --- plumbing -------------------------------------------------------------------------------

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("the Redis session store is not started")
        return self._client

    def connect(self) -> Any:
        # One immediate retry (a pooled connection dropped by a Redis restart reconnects on it),
        # no backoff: with Redis down a call fails fast (503) and a later one reconnects.
        return aioredis.Redis.from_url(
            self.url, socket_connect_timeout=self.timeout, socket_timeout=self.timeout,
            retry=Retry(NoBackoff(), 1), health_check_interval=0, decode_responses=False,
        )

    async def start(self) -> None:
        self._client = self.connect()
        for name, source in (("create", _CREATE), ("save", _SAVE), ("missing", _MISSING), ("delete", _DELETE),
                             ("reap", _REAP), ("release", _RELEASE), ("renew", _RENEW)):
            self._scripts[name] = self._client.register_script(source)
        try:
            await self.client.ping()
        except STORE_ERRORS as exc:
            # Not fatal: stateless endpoints serve without Redis; session calls answer 503 until it is up.
            metrics.SESSION_STORE_ERRORS.labels(self.name, "connect").inc()
            log.warning("session store %s is unreachable at start-up (%s); session calls answer 503 until it is up",
                        _redact(self.url), exc)

    @property
    def shared_client(self) -> Any:
        """The Redis client, for other state replicas share (the API rate limiter's buckets)."""
        return self._client

    async def secret(self) -> bytes:
        """Created by whichever replica asks first (``SET NX``), then read by all; no TTL."""
        if self._secret is None:
            await self._call("secret", self.client.set(SECRET, secrets.token_hex(32), nx=True))
            value = await self._call("secret", self.client.get(SECRET))
            if not value:
                raise SessionStoreUnavailableError("redis", "the session secret vanished")
            self._secret = bytes(value)
        return self._secret

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(*STORE_ERRORS):
                await client.aclose()

    async def _call(self, operation: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except STORE_ERRORS as exc:
            metrics.SESSION_STORE_ERRORS.labels(self.name, operation).inc()
            log.warning("session store %s failed on %s: %s", _redact(self.url), operation, exc)
            # The exception text names the Redis host and port: the log has it, the client gets the kind.
            raise SessionStoreUnavailableError("redis", type(exc).__name__) from None

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
            "state_names": names, "state_shape": shape, "learn": record.learn, "rotate": record.rotate,
            "learned": record.learned, "passed": record.passed, "passed_for": record.passed_for,
            "owner": record.owner,
        }
        # Written only when off, so a record of default options keeps its size.
        if not record.filter:
            meta["filter"] = False
        if not record.corrections:
            meta["corr"] = False
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
            last_id=int(fields.get(b"last_id", b"0")), learn=bool(meta.get("learn", True)),
            rotate=bool(meta.get("rotate", False)), learned=list(meta.get("learned", [])),
            passed=list(meta.get("passed", [])), passed_for=meta.get("passed_for"), owner=str(meta.get("owner", "")),
            filter=bool(meta.get("filter", True)), corrections=bool(meta.get("corr", True)),
        )

    # --- the store interface --------------------------------------------------------------------

    async def create(self, record: SessionRecord) -> None:
        meta, state, last_id = self.encode(record)
        ttl_ms = max(1, int(record.ttl * 1000))
        sid, keys = record.id, self.keys(record.id)
        evicted, expired, live = await self._call("create", self._script(
            "create", [keys.session, keys.seen, keys.index],
            [meta, state, last_id, ttl_ms, ttl_ms + SEEN_EXTRA_MS, repr(record.expires_at), sid,
             self.bucket_limit, keys.tag],
        ))
        metrics.SESSIONS_CREATED.labels(self.name).inc()
        if evicted:
            metrics.SESSIONS_EVICTED.labels(self.name).inc(int(evicted))
        if expired:
            metrics.SESSIONS_EXPIRED.labels(self.name).inc(int(expired))
        self._count(keys.tag, int(live))

    async def load(self, session_id: str) -> SessionRecord:
        keys = self.keys(session_id)
        fields = await self._call("load", self.client.hgetall(keys.session))
        if fields and b"meta" in fields:
            return self.decode(session_id, fields)
        why = await self._call("load", self._script("missing", [keys.session, keys.seen, keys.index], [session_id]))
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
        sid, keys = record.id, self.keys(record.id)
        saved = await self._call("save", self._script(
            "save", [keys.session, keys.seen, keys.lock, keys.index],
            [str(lock), meta, state, last_id, ttl_ms, ttl_ms + SEEN_EXTRA_MS, repr(record.expires_at), sid],
        ))
        if saved == -1:
            raise SessionNotFoundError(sid)
        if saved == -2:
            raise SessionConflictError(sid)

    async def delete(self, session_id: str) -> bool:
        keys = self.keys(session_id)
        existed = await self._call("delete", self._script(
            "delete", [keys.session, keys.seen, keys.index], [session_id]
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
            key = self.keys(session_id).lock
            delay = 0.002
            while not await self._call("lock", self.client.set(key, token, nx=True, px=self.lock_lease_ms)):
                if time.monotonic() + delay > deadline:
                    raise SessionBusyError(session_id, round(time.monotonic() - start, 3))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            renewing = asyncio.create_task(self._renew_lease(key, token))
            try:
                yield token
            finally:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
                with contextlib.suppress(SessionStoreUnavailableError):  # else the lease expires by itself
                    await self._call("unlock", self._script("release", [key], [token]))

    async def _renew_lease(self, key: str, token: str) -> None:
        """Extend the lock three times per lease while the update holds it. The lease is short so
        that a holder that died (SIGKILL, a lost host) frees the session within one lease; a live
        holder keeps it however long its update takes. A renewal that finds the lock gone stops:
        the save then refuses the update (``session_conflict``)."""
        while True:
            await asyncio.sleep(self.lock_lease / 3)
            try:
                if not await self._call("renew", self._script("renew", [key], [token, self.lock_lease_ms])):
                    return
            except SessionStoreUnavailableError:
                continue  # the save will fail the same way; keep trying until then

    async def sweep(self) -> None:
        """Reap the next ``sweep_buckets`` index buckets (all of them on one Redis) and refresh the
        gauge from the live counts last seen per bucket. A bucket whose shard is down is skipped
        (and reaped on a later round)."""
        buckets = self.buckets()
        count = min(self.sweep_buckets, len(buckets))
        chosen = [buckets[(self._next_bucket + i) % len(buckets)] for i in range(count)]
        self._next_bucket = (self._next_bucket + count) % len(buckets)
        now = repr(self.clock())
        results: list[Any] = []
        for start in range(0, len(chosen), 16):  # a few at a time: a sweep must not crowd out requests
            results += await asyncio.gather(*(
                self._call("sweep", self._script("reap", [self.index_key(tag)], [now, 1000, tag]))
                for tag in chosen[start:start + 16]
            ), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        expired = 0
        for tag, result in zip(chosen, results, strict=True):
            if not isinstance(result, BaseException):
                expired += int(result[0])
                self._live[tag] = int(result[1])
        if expired:
            metrics.SESSIONS_EXPIRED.labels(self.name).inc(expired)
        self._active.set(sum(self._live.values()))
        if failures:
            raise failures[0]

    @staticmethod
    def index_key(tag: str) -> str:
        return f"{INDEX}:{tag}" if tag else INDEX

    @property
    def bucket_limit(self) -> int:
        """Most live sessions of one index bucket: MAX_SESSIONS split evenly over the buckets."""
        return max(1, -(-self.max_sessions // len(self.buckets())))

    def _count(self, tag: str, live: int) -> None:
        self._live[tag] = live
        self._active.set(sum(self._live.values()))


def _redact(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
