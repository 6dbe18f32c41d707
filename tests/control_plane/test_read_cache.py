"""The API's read cache (control_plane/db/read_cache.py): hot reads come from memory, and every
kind of write — through another process, through this one, to any table behind the read —
is seen at once or within a notification's latency, never after the TTL. The TTL here is
4.9 s, so anything visible sooner was invalidated, not expired."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from control_plane.api.app import create_app
from control_plane.runtime import Runtime, build_runtime
from tests.control_plane.conftest import TEST_MODEL, Api, make_settings
from tests.control_plane.seed import add_checkpoint
from tests.infra.services import TestServices

TTL = 4.9
PROMPT_S = 1.0  # "promptly": well under the TTL


@pytest.fixture
async def cached(clean_state: None, services: TestServices, data_dir: Path) -> AsyncIterator[Api]:
    runtime = build_runtime(make_settings(services, data_dir, read_cache_seconds=TTL), with_backend=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)), base_url="http://testserver"
    ) as c:
        yield Api(runtime, c)
    await runtime.close()


@pytest.fixture
async def elsewhere(clean_state: None, services: TestServices, data_dir: Path) -> AsyncIterator[Runtime]:
    """Another process's view of the same database (a replica, the controller, the CLI)."""
    runtime = build_runtime(make_settings(services, data_dir, read_cache_seconds=0), with_backend=False)
    yield runtime
    await runtime.close()


async def new_run(api: Api, headers: dict[str, str]) -> str:
    sid = (await api.client.post("/v1/loops/sessions", headers=headers, json={})).json()["session"]["id"]
    r = await api.client.post(
        "/v1/loops/runs", headers=headers, json={"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8}
    )
    assert r.status_code == 200, r.text
    return r.json()["run"]["id"]


async def get_run(api: Api, headers: dict[str, str], run_id: str) -> dict:
    r = await api.client.get(f"/v1/loops/runs/{run_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["run"]


async def listening(api: Api) -> None:
    cache = api.runtime.db.read_cache
    for _ in range(200):
        if cache.listening:
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the read cache never started listening")


async def cached_run(api: Api, headers: dict[str, str]) -> str:
    """A new run whose view is in the cache (read once the listener is up, so it was stored)."""
    run_id = await new_run(api, headers)
    await get_run(api, headers, run_id)
    await listening(api)
    await get_run(api, headers, run_id)
    return run_id


async def seen_within(check, seconds: float) -> float:
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < seconds, f"not seen within {seconds} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def sql(runtime: Runtime, statement: str, **params: object) -> None:
    async with runtime.db.transaction() as s:
        await s.execute(text(statement), params)


async def test_repeated_reads_come_from_memory(cached: Api) -> None:
    t = await cached.tenant("acme")
    run_id = await new_run(cached, t.headers)
    await get_run(cached, t.headers, run_id)
    await listening(cached)
    first = await get_run(cached, t.headers, run_id)  # a miss (listening started after the first)
    cache = cached.runtime.db.read_cache
    hits = cache.hits
    for _ in range(5):
        assert await get_run(cached, t.headers, run_id) == first
    assert cache.hits == hits + 5
    ck = await cached.client.get(f"/v1/loops/checkpoints?run_id={run_id}", headers=t.headers)
    again = await cached.client.get(f"/v1/loops/checkpoints?run_id={run_id}", headers=t.headers)
    assert ck.json() == again.json() == {"checkpoints": []}
    assert cache.hits == hits + 6


async def test_writes_elsewhere_are_seen_promptly(cached: Api, elsewhere: Runtime) -> None:
    t = await cached.tenant("acme")
    run_id = await new_run(cached, t.headers)
    await get_run(cached, t.headers, run_id)
    await listening(cached)
    run = await get_run(cached, t.headers, run_id)
    assert run["status"]["name"] != "FAILED" and run["sampler"] is not None

    # the run row
    await sql(elsewhere, "UPDATE runs SET status = 'FAILED' WHERE id = :i", i=run_id)

    async def run_failed() -> bool:
        return (await get_run(cached, t.headers, run_id))["status"]["name"] == "FAILED"

    await seen_within(run_failed, PROMPT_S)

    # its paired sampler
    await get_run(cached, t.headers, run_id)
    await sql(elsewhere, "UPDATE samplers SET status = 'UNHEALTHY' WHERE run_id = :i", i=run_id)

    async def sampler_unhealthy() -> bool:
        return (await get_run(cached, t.headers, run_id))["sampler"]["status"]["name"] == "UNHEALTHY"

    await seen_within(sampler_unhealthy, PROMPT_S)

    # the creator's name
    await sql(elsewhere, "UPDATE users SET email = 'renamed@example.com' WHERE id = :i", i=t.user_id)

    async def renamed() -> bool:
        return (await get_run(cached, t.headers, run_id))["user"]["email"] == "renamed@example.com"

    await seen_within(renamed, PROMPT_S)

    # a checkpoint recorded by another process (the controller records the trainer's saves)
    url = f"/v1/loops/checkpoints?run_id={run_id}"
    assert (await cached.client.get(url, headers=t.headers)).json()["checkpoints"] == []
    await add_checkpoint(elsewhere, t, run_id, "step-1")

    async def listed() -> bool:
        return len((await cached.client.get(url, headers=t.headers)).json()["checkpoints"]) == 1

    await seen_within(listed, PROMPT_S)

    # a run deleted elsewhere answers 404, not its cached view
    await get_run(cached, t.headers, run_id)
    await sql(elsewhere, "DELETE FROM runs WHERE id = :i", i=run_id)

    async def gone() -> bool:
        return (await cached.client.get(f"/v1/loops/runs/{run_id}", headers=t.headers)).status_code == 404

    await seen_within(gone, PROMPT_S)


async def test_activity_bookkeeping_does_not_invalidate(cached: Api, elsewhere: Runtime) -> None:
    t = await cached.tenant("acme")
    run_id = await cached_run(cached, t.headers)
    await sql(elsewhere, "UPDATE runs SET last_request_at = now() WHERE id = :i", i=run_id)
    await sql(elsewhere, "UPDATE samplers SET last_request_at = now() WHERE run_id = :i", i=run_id)
    await asyncio.sleep(0.3)  # a notification, had one been sent, has arrived
    hits = cached.runtime.db.read_cache.hits
    await get_run(cached, t.headers, run_id)
    assert cached.runtime.db.read_cache.hits == hits + 1


async def test_own_writes_are_read_at_once(cached: Api) -> None:
    t = await cached.tenant("acme")
    run_id = await cached_run(cached, t.headers)
    # through the API: no wait between the write's answer and the read
    r = await cached.client.post(f"/v1/loops/runs/{run_id}/deactivate", headers=t.headers)
    assert r.status_code == 200, r.text
    assert (await get_run(cached, t.headers, run_id))["status"]["name"] in ("DEACTIVATING", "INACTIVE")
    # through this process's database transactions (the in-process controller writes so)
    await sql(cached.runtime, "UPDATE runs SET status = 'FAILED' WHERE id = :i", i=run_id)
    assert (await get_run(cached, t.headers, run_id))["status"]["name"] == "FAILED"


async def test_entries_are_per_tenant(cached: Api) -> None:
    a = await cached.tenant("acme")
    b = await cached.tenant("other-org", email="b@example.com")
    run_id = await cached_run(cached, a.headers)
    for _ in range(2):  # the second answer may come from memory: still B's own (a 404)
        r = await cached.client.get(f"/v1/loops/runs/{run_id}", headers=b.headers)
        assert r.status_code == 404 and "run" in r.json()["detail"]
        ck = await cached.client.get(f"/v1/loops/checkpoints?run_id={run_id}", headers=b.headers)
        assert ck.status_code == 200 and ck.json()["checkpoints"] == []
    assert (await get_run(cached, a.headers, run_id))["id"] == run_id


async def test_a_lost_listener_turns_the_cache_off_until_it_reconnects(cached: Api, elsewhere: Runtime) -> None:
    t = await cached.tenant("acme")
    run_id = await cached_run(cached, t.headers)
    cache = cached.runtime.db.read_cache
    pid = cache.listener_pid
    assert pid is not None
    await sql(elsewhere, "SELECT pg_terminate_backend(:p)", p=pid)
    for _ in range(100):
        if not cache.listening:
            break
        await asyncio.sleep(0.01)
    assert not cache.listening
    # a write nobody was listening for: the cache was dropped with the listener
    await sql(elsewhere, "UPDATE runs SET status = 'FAILED' WHERE id = :i", i=run_id)
    assert (await get_run(cached, t.headers, run_id))["status"]["name"] == "FAILED"
    await listening(cached)  # reconnected
    assert cache.listener_pid not in (None, pid)
    await get_run(cached, t.headers, run_id)
    hits = cache.hits
    await get_run(cached, t.headers, run_id)
    assert cache.hits == hits + 1


async def test_a_read_overtaken_by_an_invalidation_is_not_stored(cached: Api) -> None:
    cache = cached.runtime.db.read_cache
    await cache.get_or_load("run-x", "k", _value("warm-up"))
    await listening(cached)
    loads = []

    async def slow_load() -> str:
        loads.append(1)
        cache.invalidate("run-x")  # a write committed while this read was in flight
        return "old"

    assert await cache.get_or_load("run-x", "k", slow_load) == "old"
    assert await cache.get_or_load("run-x", "k", _value("new")) == "new"  # not the "old" one
    assert await cache.get_or_load("run-x", "k", _value("newer")) == "new"  # now cached


async def test_concurrent_misses_share_one_query(cached: Api) -> None:
    cache = cached.runtime.db.read_cache
    await cache.get_or_load("run-y", "k", _value("warm-up"))
    await listening(cached)
    cache.invalidate("run-y")
    loads = []

    async def slow_load() -> str:
        loads.append(1)
        await asyncio.sleep(0.05)
        return f"v{len(loads)}"

    got = await asyncio.gather(*(cache.get_or_load("run-y", "k", slow_load) for _ in range(20)))
    assert got == ["v1"] * 20 and len(loads) == 1

    async def failing() -> str:
        loads.append(1)
        await asyncio.sleep(0.05)
        raise RuntimeError("database down")

    cache.invalidate("run-y")
    results = await asyncio.gather(
        *(cache.get_or_load("run-y", "k", failing) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results) and len(loads) == 2
    assert await cache.get_or_load("run-y", "k", slow_load) == "v3"  # the failure was not cached


def _value(v: str):
    async def load() -> str:
        return v

    return load


async def test_zero_seconds_turns_it_off(api: Api) -> None:
    api.runtime.db.read_cache.ttl_s = 0
    t = await api.tenant("acme")
    run_id = await new_run(api, t.headers)
    for _ in range(3):
        await get_run(api, t.headers, run_id)
    assert api.runtime.db.read_cache.hits == 0 and not api.runtime.db.read_cache.listening
