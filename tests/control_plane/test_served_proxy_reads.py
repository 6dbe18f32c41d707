"""The served-model proxy reads a served model's rows once for a burst of requests: concurrent
requests that find its cache entry stale share one read (per org), a request that goes away
does not cancel the read the others wait for, and a failed read reaches every waiter."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from control_plane.auth.principal import Principal
from control_plane.db.models import ServedModel
from control_plane.errors import NotFound
from control_plane.sampling import served_proxy
from control_plane.services import served_models as sm_svc


def principal(org: str) -> Principal:
    return Principal(org_id=org, principal_id=f"user-{org}", key_id=f"key-{org}", scopes=frozenset(), key_hash="h")


class Reads:
    """Stands in for the rows: each read waits until ``release`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.release = asyncio.Event()
        self.fail = False

    async def get_served(self, s: Any, p: Principal, served_model_id: str) -> sm_svc.Served:
        self.calls.append((p.org_id, served_model_id))
        await self.release.wait()
        if self.fail:
            raise NotFound("served model", served_model_id)
        row = ServedModel(
            id=served_model_id,
            org_id=p.org_id,
            base_model="m",
            status="ACTIVE",
            endpoint="http://127.0.0.1:1",
            created_at=datetime.now(UTC),
        )
        return sm_svc.Served(row, [])


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    r = Reads()
    monkeypatch.setattr(served_proxy.sm_svc, "get_served", r.get_served)
    return r


def proxy() -> served_proxy.ServedModelProxy:
    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[None]:
        yield None

    return served_proxy.ServedModelProxy(SimpleNamespace(db=SimpleNamespace(session=session)))  # type: ignore[arg-type]


async def test_a_burst_shares_one_read_per_org(reads: Reads) -> None:
    px = proxy()
    acme = [asyncio.create_task(px._load(principal("acme"), "sm-1")) for _ in range(64)]
    other = asyncio.create_task(px._load(principal("other"), "sm-1"))
    await asyncio.sleep(0)
    reads.release.set()
    got = await asyncio.gather(*acme, other)
    assert sorted(reads.calls) == [("acme", "sm-1"), ("other", "sm-1")]
    assert all(g is got[0] for g in got[:64]) and got[64].model.org_id == "other"
    assert px._reading == {}


async def test_a_request_that_goes_away_leaves_the_read_to_the_others(reads: Reads) -> None:
    px = proxy()
    first = asyncio.create_task(px._load(principal("acme"), "sm-1"))
    second = asyncio.create_task(px._load(principal("acme"), "sm-1"))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    reads.release.set()
    assert (await second).model.id == "sm-1"
    assert first.cancelled() and reads.calls == [("acme", "sm-1")]


async def test_a_failed_read_reaches_every_waiter(reads: Reads) -> None:
    px = proxy()
    reads.fail = True
    waiters = [asyncio.create_task(px._load(principal("acme"), "sm-9")) for _ in range(3)]
    await asyncio.sleep(0)
    reads.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, NotFound) for r in results) and len(reads.calls) == 1
    assert px._reading == {}
