"""A run as a person looking at it wants it: its last activity in a paginated, filtered list,
and its status history together with its deployment's (the console's runs and run pages)."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.db.models import Run, StatusHistory
from control_plane.errors import InvalidInput
from control_plane.services import keyset
from control_plane.services import runs as runs_svc

MAX_LIMIT = 500


async def list_runs(
    s: AsyncSession,
    principal: Principal,
    *,
    status: str | None,
    base_model: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Run], str | None]:
    """The org's runs, newest first, ``limit`` at a time (and the cursor of the next page)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
    conds = [Run.org_id == principal.org_id]
    if status:
        conds.append(Run.status == status.upper())
    if base_model:
        conds.append(Run.base_model == base_model)
    return await keyset.newest_first(s, Run, conds, limit, cursor, "cursor")


async def history(s: AsyncSession, principal: Principal, run_id: str) -> list[StatusHistory]:
    """The run's status changes and those of the deployments it ran on, oldest first."""
    run = await runs_svc.get_run(s, principal, run_id)
    wanted = [(StatusHistory.resource_type == "run") & (StatusHistory.resource_id == run.id)]
    if run.deployment_id:
        wanted.append((StatusHistory.resource_type == "deployment") & (StatusHistory.resource_id == run.deployment_id))
    q = (
        select(StatusHistory)
        .where(StatusHistory.org_id == principal.org_id, or_(*wanted))
        .order_by(StatusHistory.created_at, StatusHistory.id)
    )
    return list((await s.execute(q)).scalars())
