"""What the routes that start workloads or open sessions wrap their writes in: the org's GPU
capacity (:mod:`.capacity`) and its guard rails (:mod:`.org_limits`), checked in the same
transaction as the rows they admit::

    async with db.transaction() as s:
        async with admission.run(s, settings, catalog, principal.org_id):
            created = await runs_svc.create_run(s, ...)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog import ModelCatalog
from control_plane.services import org_limits
from control_plane.services.capacity import CapacityPolicy, reserving
from control_plane.settings import Settings


@asynccontextmanager
async def run(s: AsyncSession, settings: Settings, catalog: ModelCatalog, org_id: str) -> AsyncIterator[None]:
    """A new run: the org's active-run limit, then capacity for what the body creates (its
    deployment unless it reuses a warm one, its paired sampler)."""
    policy = CapacityPolicy.of(settings, catalog)
    async with reserving(s, policy, org_id):
        await org_limits.check_active_runs(s, org_id, settings.max_active_runs_per_org, policy.retry_after_s)
        yield


@asynccontextmanager
async def workload(s: AsyncSession, settings: Settings, catalog: ModelCatalog, org_id: str) -> AsyncIterator[None]:
    """A new sampler, sampling session or served model: capacity for what the body creates."""
    async with reserving(s, CapacityPolicy.of(settings, catalog), org_id):
        yield


async def session(s: AsyncSession, settings: Settings, org_id: str) -> None:
    """A new session: the org's active-session limit (before the row is written)."""
    await org_limits.check_active_sessions(
        s, org_id, settings.max_active_sessions_per_org, float(settings.capacity_retry_after_seconds)
    )
