"""Sessions (shared by the Loops and Tinker APIs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.db.models import Run, Sampler, Session, TrainingProject
from control_plane.errors import InvalidInput, NotFound
from control_plane.ids import new_id, new_session_id
from control_plane.services import history
from control_plane.services.deployments import release_run
from control_plane.statuses import TERMINAL, SessionStatus


async def default_project(s: AsyncSession, principal: Principal) -> TrainingProject:
    proj = (
        (
            await s.execute(
                select(TrainingProject).where(
                    TrainingProject.org_id == principal.org_id, TrainingProject.name == "default"
                )
            )
        )
        .scalars()
        .first()
    )
    if proj is None:
        proj = TrainingProject(
            id=new_id("proj"), org_id=principal.org_id, name="default", created_by=principal.principal_id
        )
        s.add(proj)
        await s.flush()
    return proj


async def create_session(
    s: AsyncSession,
    principal: Principal,
    *,
    origin: str,
    training_project_id: str | None = None,
    tags: list[str] | None = None,
    user_metadata: dict[str, Any] | None = None,
    sdk_version: str | None = None,
    display_name: str | None = None,
) -> Session:
    if training_project_id is not None:
        proj = await s.get(TrainingProject, training_project_id)
        if proj is None or proj.org_id != principal.org_id:
            raise InvalidInput(f"training project {training_project_id!r} not found", field="training_project_id")
    else:
        proj = await default_project(s, principal)
    now = datetime.now(UTC)
    row = Session(
        id=new_session_id(),
        org_id=principal.org_id,
        created_by=principal.principal_id,
        training_project_id=proj.id,
        origin=origin,
        status=SessionStatus.ACTIVE.value,
        tags=list(tags or []),
        user_metadata=dict(user_metadata or {}),
        sdk_version=sdk_version,
        display_name=display_name,
        last_heartbeat_at=now,
        created_at=now,
    )
    s.add(row)
    await s.flush()
    return row


async def get_session(s: AsyncSession, principal: Principal, session_id: str) -> Session:
    row = await s.get(Session, session_id)
    if row is None or row.org_id != principal.org_id:
        raise NotFound("session", session_id)
    return row


FINISH_REASONS = ("success", "errored", "interrupted")


async def finish_session(
    s: AsyncSession, principal: Principal, session_id: str, reason: str, detail: str | None
) -> Session:
    """End a session: the first reason wins, its live runs and samplers are torn down."""
    if reason not in FINISH_REASONS:
        raise InvalidInput(f"reason.type must be one of {list(FINISH_REASONS)}", field="reason.type")
    row = await get_session(s, principal, session_id)
    if row.status == SessionStatus.ACTIVE.value:
        row.status = SessionStatus.FINISHED.value
        row.finish_reason = reason
        row.finish_detail = detail[:4000] if detail else None
        row.finished_at = datetime.now(UTC)
        await end_session_runs(s, row.id, f"session finished ({reason})")
        for smp in (await s.execute(select(Sampler).where(Sampler.session_id == row.id))).scalars():
            history.request_deactivation(s, "sampler", smp, f"session finished ({reason})")
        await s.flush()
    return row


async def end_session_runs(s: AsyncSession, session_id: str, reason: str) -> None:
    """Request teardown of a session's live runs (the controller finishes it)."""
    runs = (
        await s.execute(select(Run).where(Run.session_id == session_id, Run.status.notin_([x.value for x in TERMINAL])))
    ).scalars()
    for run in runs:
        if history.request_deactivation(s, "run", run, reason):
            run.deactivated_at = datetime.now(UTC)
            await release_run(s, run, f"run {run.id}: {reason}")
