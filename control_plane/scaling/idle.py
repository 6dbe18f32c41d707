"""When a resource counts as idle."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Protocol

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.scaling.activity import pending_activity
from control_plane.scaling.kinds import Kind
from control_plane.services import history
from control_plane.statuses import Status


class Scalable(Protocol):
    scale_down_delay_seconds: int
    last_request_at: datetime | None
    updated_at: datetime


def last_active(row: Scalable, pending: datetime | None = None) -> datetime:
    """The latest of: the last request (flushed or still ``pending`` in Redis) and the last
    status change (a resource that just became ACTIVE or woke up is not idle)."""
    times = [t for t in (row.last_request_at, row.updated_at, pending) if t is not None]
    return max(times)


def idle_seconds(row: Scalable, now: datetime, pending: datetime | None = None) -> float:
    return (now - last_active(row, pending)).total_seconds()


def is_idle(row: Scalable, now: datetime, pending: datetime | None = None) -> bool:
    return now - last_active(row, pending) >= timedelta(seconds=row.scale_down_delay_seconds)


async def scale_down_if_idle(s: AsyncSession, redis: aioredis.Redis, kind: Kind, row: Any, now: datetime) -> bool:
    """Inside a transaction that holds ``row`` locked: an ACTIVE row idle for its
    ``scale_down_delay_seconds`` (activity still pending in Redis counts) becomes
    SCALED_TO_ZERO with a history row. The caller then scales the workload to 0."""
    if row.status != Status.ACTIVE.value:
        return False
    pending = await pending_activity(redis, kind, row.id)
    if not is_idle(row, now, pending):
        return False
    idle = idle_seconds(row, now, pending)
    reason = f"idle for {idle:.0f}s (scale_down_delay_seconds={row.scale_down_delay_seconds})"
    return history.transition(s, kind.name, row, Status.SCALED_TO_ZERO, reason)
