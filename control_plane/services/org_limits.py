"""Guard rails per org on what its keys may hold at once, beyond the per-key request rate
(control_plane/auth/authenticator.py) and GPU capacity (:mod:`.capacity`):

- active sessions (``max_active_sessions_per_org``): Tinker sessions not finished or expired
  (idle ones expire), and Loops sessions of the last 24 hours (the Loops protocol never ends a
  session, so one counts for a day after its creation);
- active runs (``max_active_runs_per_org``): runs (training models) neither ended nor being
  deactivated, a run scaled to zero included.

Each check runs under the org's capacity lock (:func:`control_plane.services.capacity.lock_org`,
already held inside :func:`~control_plane.services.capacity.reserving`), so concurrent
creates do not pass the limit together. A refusal is 429 ``limit_exceeded`` whose
``details.reason`` is the setting's name. Futures in flight are counted in Redis
(control_plane/training/inflight.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Run, Session
from control_plane.errors import LimitExceeded
from control_plane.services.capacity import lock_org
from control_plane.statuses import TERMINAL, SessionStatus, Status

LOOPS_SESSION_COUNTS_FOR = timedelta(hours=24)
RUNS = "max_active_runs_per_org"
ENDING = TERMINAL | {Status.DEACTIVATING}  # a run being deactivated no longer counts
SESSIONS = "max_active_sessions_per_org"


async def check_active_runs(s: AsyncSession, org_id: str, limit: int, retry_after_s: float) -> None:
    """Refuse one more run when the org holds ``limit`` runs that have not ended (call with the
    org's lock held)."""
    n = (
        await s.execute(
            select(func.count())
            .select_from(Run)
            .where(Run.org_id == org_id, Run.status.not_in([x.value for x in ENDING]))
        )
    ).scalar_one()
    if n >= limit:
        raise LimitExceeded(
            f"the org has {n} runs that have not ended, the most this server allows ({RUNS} = {limit}); "
            "deactivate runs it no longer uses",
            retry_after_s,
            reason=RUNS,
        )


async def check_active_sessions(s: AsyncSession, org_id: str, limit: int, retry_after_s: float) -> None:
    """Take the org's lock and refuse one more session when the org holds ``limit`` active
    ones."""
    await lock_org(s, org_id)
    n = (
        await s.execute(
            select(func.count())
            .select_from(Session)
            .where(
                Session.org_id == org_id,
                Session.status == SessionStatus.ACTIVE.value,
                or_(Session.origin == "tinker", Session.created_at > datetime.now(UTC) - LOOPS_SESSION_COUNTS_FOR),
            )
        )
    ).scalar_one()
    if n >= limit:
        raise LimitExceeded(
            f"the org has {n} active sessions, the most this server allows ({SESSIONS} = {limit}); finish "
            "sessions (ServiceClient.close / POST /v1/loops/sessions/{id}/finish) or let idle ones expire",
            retry_after_s,
            reason=SESSIONS,
        )
