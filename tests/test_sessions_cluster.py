"""Sessions on a real Redis Cluster (3 primaries + 3 replicas of ``redis-server
--cluster-enabled yes`` on loopback ports) shared by two uvicorn replicas: sessions land on every
shard; a session continues across replicas with the predictions stateless ``/v1/predict`` gives
for the whole text; with one primary killed, the other shards' sessions keep working while the
lost shard's answer 503 (never 500); once its replica is promoted, they continue."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from processes import REDIS_CLI, REDIS_SERVER, RedisCluster, RedisServer

from service.sessions.redis_cluster import RedisClusterStore

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None or REDIS_CLI is None,
                       reason="redis-server/redis-cli are not installed (apt install redis-server)"),
]


def probabilities(body: dict) -> dict[str, float]:
    return {p["word"]: p["probability"] for p in body["predictions"]}


def assert_matches_predict(client: httpx.Client, body: dict, text: str) -> None:
    want = client.post("/v1/predict", json={"text": text, "k": 20, "model": "tiny"}).json()
    assert (body["prefix"], body["context_words"]) == (want["prefix"], want["context_words"]), text
    got, expected = probabilities(body), probabilities(want)
    assert set(got) == set(expected), text
    assert all(abs(got[w] - p) <= 1e-5 for w, p in expected.items()), text


def test_sessions_on_a_redis_cluster_survive_a_failover(
    model_repository: Path, start_server: Callable, tmp_path: Path
) -> None:
    cluster = RedisCluster(tmp_path / "cluster").start()
    try:
        run_scenario(cluster, model_repository, start_server)
    finally:
        cluster.stop()


def run_scenario(cluster: RedisCluster, model_repository: Path, start_server: Callable) -> None:
    env = {"NEXTWORD_SESSION_STORE": cluster.url, "NEXTWORD_SESSION_STORE_TIMEOUT_SECONDS": "1"}
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: start_server(model_repository, env=env), range(2))
    keys = RedisClusterStore(cluster.url, 1).keys  # key names only: no connection
    with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
        # Sessions, created on either replica, until every shard holds some.
        texts: dict[str, str] = {}
        shard: dict[str, RedisServer] = {}
        while len(set(shard.values())) < 3:
            assert len(texts) < 60, "60 sessions and still a shard without one"
            text = "the quick "
            r = (on_a, on_b)[len(texts) % 2].post("/v1/sessions", json={"model": "tiny", "text": text, "k": 20})
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            texts[sid] = text
            shard[sid] = cluster.primary_for_key(keys(sid).session)
            # The record really is on that node (a plain client: no redirection).
            assert shard[sid].client().exists(keys(sid).session, keys(sid).seen) == 2

        def update(client: httpx.Client, sid: str, delta: str) -> httpx.Response:
            r = client.post(f"/v1/sessions/{sid}/text", json={"text": delta})
            if r.status_code == 200:
                texts[sid] += delta
                assert_matches_predict(client, r.json(), texts[sid])
            return r

        # Every session continues on the other replica, then back, with exact predictions.
        for sid in texts:
            for client, delta in ((on_b, "brown fox ju"), (on_a, "mps over")):
                assert update(client, sid, delta).status_code == 200

        # A primary dies (SIGKILL), once its replica holds everything written to it.
        victim = shard[next(iter(texts))]
        replica = cluster.replica_of(victim)
        victim.kill()
        lost = [sid for sid in texts if shard[sid] is victim]
        kept = [sid for sid in texts if shard[sid] is not victim]
        statuses = []
        for sid in lost:
            r = update(on_a, sid, " the")
            statuses.append(r.status_code)
            if r.status_code != 200:
                assert r.json()["error"]["type"] == "session_store_unavailable", r.text
                assert r.headers.get("retry-after") == "1"
        # The first of them is asked within milliseconds of the kill, long before a failover
        # (which needs the 1 s node timeout first); later ones may already see the replica.
        assert statuses[0] == 503 and set(statuses) <= {200, 503}, statuses
        for sid in kept:
            assert update(on_b, sid, " the").status_code == 200

        # The replica is promoted by the cluster itself; the lost shard's sessions continue.
        cluster.wait_until(lambda: cluster.primary_for_key(keys(lost[0]).session) is replica, 30, "failover")
        deadline = time.monotonic() + 10
        for sid in lost:
            for client in (on_a, on_b):
                while (r := update(client, sid, " dog")).status_code == 503 and time.monotonic() < deadline:
                    time.sleep(0.1)  # a replica's client may meet the dead node once more
                assert r.status_code == 200, r.text
        for sid in texts:
            info = on_a.get(f"/v1/sessions/{sid}").json()
            assert info["committed_words"] == len(texts[sid].split()) - (0 if texts[sid].endswith(" ") else 1)


def test_cluster_store_bounds_buckets_counts_expiries_once_and_sums_the_gauge(tmp_path: Path) -> None:
    """The store itself on a 3-primary cluster: MAX_SESSIONS is split over the 1024 buckets (here
    1 each), a full bucket evicts its session closest to expiry, an expiry is counted once however
    many replicas sweep, and the gauge sums the buckets."""
    import asyncio
    import secrets

    from service import metrics
    from service.sessions.errors import SessionExpiredError
    from service.sessions.store import SessionRecord

    def counter(metric) -> float:
        return metric.labels("redis")._value.get()

    def record(sid: str, ttl: float) -> SessionRecord:
        now = time.time()
        return SessionRecord(id=sid, model="tiny", version=1, created=now, last_used=now, ttl=ttl)

    async def scenario(url: str) -> None:
        replicas = [RedisClusterStore(url, max_sessions=1024, timeout=1.0) for _ in range(2)]
        for store in replicas:
            store.sweep_buckets = 1024  # a whole round per sweep
            await store.start()
        one, two = replicas
        assert one.bucket_limit == 1
        by_bucket: dict[str, list[str]] = {}
        while not any(len(ids) >= 2 for ids in by_bucket.values()):
            sid = secrets.token_urlsafe(24)
            by_bucket.setdefault(one.tag(sid), []).append(sid)
        first, second = next(ids for ids in by_bucket.values() if len(ids) >= 2)[:2]
        evicted = counter(metrics.SESSIONS_EVICTED)
        await one.create(record(first, 60))
        await two.create(record(second, 60))  # same bucket, full: the first one goes
        assert counter(metrics.SESSIONS_EVICTED) - evicted == 1
        with pytest.raises(SessionExpiredError) as gone:
            await two.load(first)
        assert gone.value.reason == "evicted"
        assert (await one.load(second)).id == second

        # Short-lived sessions in other buckets expire; both replicas sweep; each counted once.
        short = [sid for ids in by_bucket.values() if ids[0] not in (first, second) for sid in ids[:1]][:5]
        for sid in short:
            await one.create(record(sid, 0.3))
        await asyncio.sleep(0.6)
        expired = counter(metrics.SESSIONS_EXPIRED)
        await asyncio.gather(one.sweep(), two.sweep())
        await one.sweep()
        assert counter(metrics.SESSIONS_EXPIRED) - expired == len(short)
        assert metrics.SESSIONS_ACTIVE.labels("redis")._value.get() == 1  # `second`, summed over 1024 buckets
        for store in replicas:
            await store.close()

    cluster = RedisCluster(tmp_path / "cluster", replicas=0).start()
    try:
        asyncio.run(scenario(cluster.url))
    finally:
        cluster.stop()


def test_cluster_store_warns_about_a_cluster_configured_otherwise(tmp_path: Path, caplog) -> None:
    """A cluster that stops every shard when one is lost, or evicts nothing, is named in the log."""
    import asyncio
    import logging

    cluster = RedisCluster(tmp_path / "cluster", primaries=3, replicas=0).start()
    try:
        for node in cluster.nodes:
            node.client().config_set("maxmemory-policy", "noeviction")

        async def start() -> None:
            store = RedisClusterStore(cluster.url, 1000, timeout=1.0)
            await store.start()
            await store.close()

        with caplog.at_level(logging.WARNING, logger="service.sessions.redis"):
            asyncio.run(start())
    finally:
        cluster.stop()
    warnings = [r.getMessage() for r in caplog.records]
    assert any("maxmemory-policy noeviction" in w and "volatile-ttl" in w for w in warnings), warnings
    assert not any("cluster-require-full-coverage" in w for w in warnings), warnings
