"""Request activity of runs, samplers and deployments.

A request records ``now`` in a Redis hash (one HSET, no Postgres write); the controller drains
the hashes into ``last_request_at`` once per pass, before it decides what is idle.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import redis.asyncio as aioredis
from sqlalchemy import func, update

from control_plane.db.engine import Database
from control_plane.db.last_seen import drain_hash
from control_plane.scaling.kinds import KINDS, Kind


def activity_key(kind: Kind) -> str:
    return f"openloops:lastrequest:{kind.name}"


async def record_activity(redis: aioredis.Redis, kind: Kind, resource_id: str, at: float | None = None) -> None:
    await redis.hset(activity_key(kind), resource_id, f"{time.time() if at is None else at:.3f}")


async def record_activities(redis: aioredis.Redis, items: list[tuple[Kind, str]]) -> None:
    """:func:`record_activity` of several resources in one round trip."""
    now = f"{time.time():.3f}"
    async with redis.pipeline(transaction=False) as pipe:
        for kind, resource_id in items:
            pipe.hset(activity_key(kind), resource_id, now)
        await pipe.execute()


async def pending_activity(redis: aioredis.Redis, kind: Kind, resource_id: str) -> datetime | None:
    """Activity recorded but not flushed yet (the controller re-checks this just before it
    scales something down)."""
    raw = await redis.hget(activity_key(kind), resource_id)
    return datetime.fromtimestamp(float(raw), UTC) if raw else None


async def flush_activity(db: Database, redis: aioredis.Redis) -> int:
    """Move recorded activity into ``last_request_at`` (never backwards). Returns the number
    of resources updated."""
    n = 0
    for kind in KINDS.values():
        seen = await drain_hash(redis, activity_key(kind))
        if not seen:
            continue
        model = kind.model
        async with db.transaction() as s:
            for rid, ts in sorted(seen.items()):
                at = datetime.fromtimestamp(float(ts), UTC)
                await s.execute(
                    update(model)
                    .where(model.id == rid.decode())
                    .values(last_request_at=func.greatest(func.coalesce(model.last_request_at, at), at))
                )
        n += len(seen)
    return n
