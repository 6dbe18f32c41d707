"""The in-process layer of key authentication: leased rate-limit tokens, the shared budget
across replicas, a disabled local cache, buffered last-used times (real Redis and Postgres)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from control_plane.api.app import create_app
from control_plane.auth.authenticator import BUCKET_PREFIX, LAST_SEEN_KEYS, RateLimit, invalidate_key
from control_plane.auth.keys import hash_key
from control_plane.runtime import Runtime, build_runtime
from control_plane.services import identity
from control_plane.settings import Settings
from tests.control_plane.conftest import Tenant, make_settings, make_tenant

ROUTE = "/v1/loops/capabilities"


@asynccontextmanager
async def replica(settings: Settings) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    rt = build_runtime(settings, with_backend=False)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rt)), base_url="http://testserver")
    try:
        yield rt, client
    finally:
        await client.aclose()
        await rt.close()


async def bucket_tokens(rt: Runtime, key: str) -> float:
    return float(await rt.redis.hget(BUCKET_PREFIX + hash_key(key), "t"))


def test_lease_size_follows_the_rate() -> None:
    assert RateLimit(True, 2.0, 3).lease == 1  # slow keys take one token per round trip: exact
    assert RateLimit(True, 100.0, 50).lease == 10  # a tenth of a second's allowance
    assert RateLimit(True, 1e6, 20).lease == 20  # never more than the bucket


async def test_a_lease_serves_requests_without_a_round_trip(clean_state, services, data_dir) -> None:
    settings = make_settings(
        services, data_dir, rate_limit_enabled=True, rate_limit_per_second=100.0, rate_limit_burst=50
    )
    async with replica(settings) as (rt, client):
        t = await make_tenant(rt, "acme")
        assert (await client.get(ROUTE, headers=t.headers)).status_code == 200
        after_first = await bucket_tokens(rt, t.key)
        assert 39 <= after_first < 41  # 50 - a lease of 10 (+ a little refill)
        for _ in range(9):  # the rest of the lease: the shared bucket is not touched
            assert (await client.get(ROUTE, headers=t.headers)).status_code == 200
        assert await bucket_tokens(rt, t.key) == after_first
        assert (await client.get(ROUTE, headers=t.headers)).status_code == 200  # a new lease
        assert await bucket_tokens(rt, t.key) < after_first - 5  # 10 taken, a little refilled


async def test_replicas_share_one_budget(clean_state, services, data_dir) -> None:
    settings = make_settings(services, data_dir, rate_limit_enabled=True, rate_limit_per_second=2.0, rate_limit_burst=6)
    async with replica(settings) as (rt1, c1), replica(settings) as (_rt2, c2):
        t = await make_tenant(rt1, "acme")
        codes = {c1: [], c2: []}  # type: dict[httpx.AsyncClient, list[int]]
        for _ in range(8):
            for c in (c1, c2):
                codes[c].append((await c.get(ROUTE, headers=t.headers)).status_code)
        ok = sum(x == 200 for cs in codes.values() for x in cs)
        assert 6 <= ok <= 7, codes  # the burst (+ at most one token refilled meanwhile), not 6 per replica
        assert 429 in codes[c1] and 429 in codes[c2]
        r = await c2.get(ROUTE, headers=t.headers)
        assert r.status_code == 429 and r.json()["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1


async def used_then_revoked(rt: Runtime, client: httpx.AsyncClient) -> Tenant:
    """A key that has just served a request (cached), then revoked as the admin CLI does."""
    t = await make_tenant(rt, "acme")
    assert (await client.get(ROUTE, headers=t.headers)).status_code == 200
    async with rt.db.transaction() as s:
        key = await identity.revoke_api_key(s, await identity.get_api_key(s, t.principal.key_id))
    await invalidate_key(rt.redis, key.key_hash)
    return t


async def test_without_the_local_cache_every_request_asks_redis(clean_state, services, data_dir) -> None:
    settings = make_settings(services, data_dir, key_local_cache_seconds=0.0)
    async with replica(settings) as (rt, client):
        t = await used_then_revoked(rt, client)
        assert (await client.get(ROUTE, headers=t.headers)).status_code == 401  # at once


async def test_local_cache_holds_a_revoked_key_at_most_its_ttl(clean_state, services, data_dir) -> None:
    settings = make_settings(services, data_dir, key_local_cache_seconds=0.9)
    async with replica(settings) as (rt, client):
        t = await used_then_revoked(rt, client)
        # still served from this process's entry (the TTL is the documented bound) ...
        assert (await client.get(ROUTE, headers=t.headers)).status_code == 200
        await asyncio.sleep(0.95)
        assert (await client.get(ROUTE, headers=t.headers)).status_code == 401  # ... and no longer


def test_local_cache_ttl_must_stay_below_one_second(services, data_dir) -> None:
    with pytest.raises(ValueError, match="key_local_cache_seconds"):
        make_settings(services, data_dir, key_local_cache_seconds=1.0)


async def test_last_used_times_are_buffered_then_shared(clean_state, services, data_dir) -> None:
    async with replica(make_settings(services, data_dir)) as (rt, client):
        t = await make_tenant(rt, "acme")
        assert (await client.get(ROUTE, headers=t.headers)).status_code == 200
        await rt.redis.delete(LAST_SEEN_KEYS)  # the first lookup's round trip recorded it
        assert (await client.get(ROUTE, headers=t.headers)).status_code == 200  # served locally
        assert not await rt.redis.hexists(LAST_SEEN_KEYS, hash_key(t.key))
        await rt.authenticator.flush_seen()
        assert await rt.redis.hexists(LAST_SEEN_KEYS, hash_key(t.key))
