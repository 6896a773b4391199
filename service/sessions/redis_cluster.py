"""The Redis session store on Redis Cluster (``NEXTWORD_SESSION_STORE=redis+cluster://host:port``,
any one node: the client discovers the others and follows failovers and resharding).

It is :class:`RedisStore` (same scripts, same record format, same lock) with two differences:

* **Keys carry a hash tag.** Redis Cluster runs a script only when all its keys hash to one
  slot. A session's keys, and the index its scripts update, share the tag ``{sNNN}``: one of
  1024 *buckets*, chosen from the session id (CRC-32 mod 1024, so any replica finds it), e.g.
  ``nextword:session:{s1f3}<id>``, ``nextword:session-seen:{s1f3}<id>``,
  ``nextword:session-lock:{s1f3}<id>`` and ``nextword:sessions:{s1f3}``. The 1024 tags spread
  over the 16384 slots, so sessions spread over all shards (about evenly beyond a few shards),
  and each bucket's scripts stay atomic on its shard.
* **What was global is per bucket.** Each bucket's sorted set bounds it to
  ``ceil(MAX_SESSIONS / 1024)`` live sessions (a full bucket evicts its session closest to
  expiry), counts its expiries once, and its size feeds the gauge. So ``MAX_SESSIONS`` still
  bounds the total, but eviction may start in a bucket that fills up before the whole store is
  full (with random ids, from ~70 % of the total at the default 100,000, ~30 % at 10,000). The memory limit that
  matters on a cluster is each shard's ``maxmemory`` (``docs/scaling.md``): run it with
  ``maxmemory-policy volatile-ttl``, which evicts what this store would (keys closest to expiry;
  an evicted session then answers ``session_expired``).

A shard that is down makes only its buckets' sessions fail (503 ``session_store_unavailable``)
when the cluster runs with ``cluster-require-full-coverage no``; once its replica is promoted the
client follows the new topology and they continue.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff

from service.sessions.redis_store import STORE_ERRORS, RedisStore, _redact

log = logging.getLogger("service.sessions.redis")

BUCKETS = 1024
SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}


def client_url(url: str) -> str:
    """``redis+cluster://host:port`` as the plain URL redis-py's cluster client takes."""
    for scheme, plain in SCHEMES.items():
        if url.startswith(scheme):
            return plain + url[len(scheme):]
    raise ValueError(f"not a Redis Cluster URL: {url!r} (expected redis+cluster://host:port)")


class RedisClusterStore(RedisStore):
    _tags = [f"{{s{i:03x}}}" for i in range(BUCKETS)]

    def tag(self, session_id: str) -> str:
        return self._tags[zlib.crc32(session_id.encode()) % BUCKETS]

    def buckets(self) -> list[str]:
        return self._tags

    async def start(self) -> None:
        await super().start()
        await self._check_configuration()

    async def _check_configuration(self) -> None:
        """Say at start-up when the cluster is not configured as this store expects (one node's
        view; where CONFIG is not allowed, as on some managed services, nothing is said)."""
        expected = {"cluster-require-full-coverage": "no", "maxmemory-policy": "volatile-ttl"}
        for name, want in expected.items():
            try:
                value = (await self.client.config_get(name)).get(name)
            except STORE_ERRORS:
                return
            if value is not None and value != want:
                log.warning("Redis Cluster %s has %s %s; the session store expects %s (docs/scaling.md)",
                            _redact(self.url), name, value, want)

    def connect(self) -> Any:
        # Two retries 50 ms apart: a command that meets a dead or demoted node makes the client
        # reload the slot map, then go to the node serving the slot now. With a primary down and
        # no replica promoted yet, the call then fails (503) instead of waiting.
        return RedisCluster.from_url(
            client_url(self.url), socket_connect_timeout=self.timeout, socket_timeout=self.timeout,
            retry=Retry(ConstantBackoff(0.05), 2), require_full_coverage=False, decode_responses=False,
            # Per node. Past it the client fails a call rather than waiting; the single-Redis pool
            # is unbounded, so keep this far above any concurrency a pod reaches.
            max_connections=1000,
        )
