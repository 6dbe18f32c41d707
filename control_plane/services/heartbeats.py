"""Tinker session liveness: heartbeats land in Redis, are flushed to Postgres in batches, and
sessions whose heartbeats stopped expire (their live runs are deactivated)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from sqlalchemy import select, update

from control_plane.db.engine import Database
from control_plane.db.last_seen import drain_hash
from control_plane.db.models import Session
from control_plane.services.sessions import end_session_runs
from control_plane.statuses import SessionStatus

LAST_SEEN_SESSIONS = "openloops:lastseen:sessions"


async def record_heartbeat(redis: aioredis.Redis, session_id: str) -> None:
    await redis.hset(LAST_SEEN_SESSIONS, session_id, f"{time.time():.3f}")


async def flush_session_heartbeats(db: Database, redis: aioredis.Redis) -> int:
    seen = await drain_hash(redis, LAST_SEEN_SESSIONS)
    if not seen:
        return 0
    async with db.transaction() as s:
        for sid, ts in seen.items():
            await s.execute(
                update(Session)
                .where(Session.id == sid.decode(), Session.status == SessionStatus.ACTIVE.value)
                .values(last_heartbeat_at=datetime.fromtimestamp(float(ts), UTC))
            )
    return len(seen)


async def expire_sessions(db: Database, max_idle: timedelta) -> list[str]:
    cutoff = datetime.now(UTC) - max_idle
    async with db.transaction() as s:
        rows = list(
            (
                await s.execute(
                    select(Session)
                    .where(
                        Session.origin == "tinker",
                        Session.status == SessionStatus.ACTIVE.value,
                        Session.last_heartbeat_at < cutoff,
                    )
                    .with_for_update(skip_locked=True)
                )
            ).scalars()
        )
        for sess in rows:
            sess.status = SessionStatus.EXPIRED.value
            sess.finished_at = datetime.now(UTC)
            await end_session_runs(s, sess.id, "session expired (no heartbeat)")
    return [x.id for x in rows]
