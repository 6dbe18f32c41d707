"""The request path of scale to zero: record activity, wake what sleeps, wait for it.

Route handlers that carry traffic to a run, sampler or deployment call::

    await touch_and_wake(runtime, "deployment", deployment_id)

after their tenant check and before they use the workload (it returns True when it had to
wait, so cached endpoints can be refreshed). It costs one Redis HSET and one primary-key
SELECT when the resource is awake. When it is SCALED_TO_ZERO it moves the row to
WAKING_UP (history row), kicks the controller and waits (bounded by
``settings.wake_timeout_seconds``) until the controller has seen the workload ready and made
the row ACTIVE; it then returns and the request proceeds. If the wake-up fails it raises
:class:`~control_plane.errors.Unavailable`; if it takes too long, :class:`WakeTimeout`
(both 503 with a JSON body).

Waking holds capacity again (control_plane/services/capacity.py): the move to WAKING_UP is
made under the org's capacity lock, and refused when the org is at its ceiling. Then the row
stays SCALED_TO_ZERO with a ``status_reason`` saying it waits for capacity, and
:func:`touch_and_wake` raises :class:`~control_plane.errors.CapacityExceeded` (429
``loops_capacity``: the request is retried later by the SDK), while :func:`request_wake`
(ops queued for a trainer, health checks, the controller) returns: a trainer with ops waiting
is woken by the controller's next pass once the org has room.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub
from sqlalchemy import select

from control_plane.errors import CapacityExceeded, NotFound, Unavailable
from control_plane.scaling.activity import record_activities, record_activity
from control_plane.scaling.kinds import DEPLOYMENT, RUN, Kind, KindName, kind_of
from control_plane.services import history
from control_plane.services.capacity import CapacityPolicy, reserving
from control_plane.statuses import TERMINAL, Status

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

log = structlog.get_logger("openloops.scaling")

WOKEN_CHANNEL = "openloops:woken"
ASLEEP = frozenset({Status.SCALED_TO_ZERO, Status.WAKING_UP})
RECHECK_SECONDS = 1.0  # re-read the row this often while waiting, even without a notification


class WakeTimeout(Unavailable):
    """A scaled-to-zero resource did not become ready within ``wake_timeout_seconds``."""

    code = "waking_up"


async def notify_woken(redis: aioredis.Redis, kind: Kind, resource_id: str) -> None:
    """The controller's side: a WAKING_UP row changed status (ACTIVE, or failed)."""
    await redis.publish(WOKEN_CHANNEL, f"{kind.name}:{resource_id}".encode())


async def touch_and_wake(runtime: Runtime, kind: KindName, resource_id: str, *, timeout_s: float | None = None) -> bool:
    """Record a request for ``resource_id``; if it is scaled to zero, wake it and wait until it
    is ACTIVE. Returns True when it had to wait (callers may refresh cached endpoints)."""
    k = kind_of(kind)
    await record_activity(runtime.redis, k, resource_id)
    status = await _status(runtime, k, resource_id)
    if status not in ASLEEP:
        return False
    timeout = runtime.settings.wake_timeout_seconds if timeout_s is None else timeout_s
    started = time.monotonic()
    pubsub = runtime.redis.pubsub()
    try:
        await pubsub.subscribe(WOKEN_CHANNEL)  # before waking, so no notification is missed
        if status == Status.SCALED_TO_ZERO:
            await _request_wake(runtime, k, resource_id)
        await runtime.kick_controller()
        await _wait_active(runtime, k, resource_id, pubsub, started + timeout)
    finally:
        with contextlib.suppress(Exception):
            await pubsub.unsubscribe()
            await pubsub.aclose()
    log.info("woke up", kind=k.name, id=resource_id, waited_s=round(time.monotonic() - started, 3))
    return True


async def op_arrived(runtime: Runtime, run_id: str, deployment_id: str | None, run_status: str) -> None:
    """A training op for ``run_id`` was queued: activity of the run and of its deployment (what
    keeps its trainer up; heartbeats do not), and a scaled-to-zero trainer is woken without
    waiting (the op waits in the run's log; the client polls its future meanwhile)."""
    if deployment_id is None:
        await record_activity(runtime.redis, RUN, run_id)
        return
    await record_activities(runtime.redis, [(RUN, run_id), (DEPLOYMENT, deployment_id)])
    if run_status in (Status.SCALED_TO_ZERO.value, Status.WAKING_UP.value):
        await request_wake(runtime, "deployment", deployment_id)


async def request_wake(
    runtime: Runtime, kind: KindName, resource_id: str, reason: str = "woken by a request", *, strict: bool = False
) -> Status:
    """Ask for a scaled-to-zero resource to wake up and return at once (the controller brings
    it back); the status it had. Records the request as activity too. When the org is at its
    capacity ceiling the resource stays asleep: ``strict`` raises CapacityExceeded, otherwise
    this returns (the row's reason says it waits for capacity)."""
    k = kind_of(kind)
    await record_activity(runtime.redis, k, resource_id)
    status = await _status(runtime, k, resource_id)
    if status == Status.SCALED_TO_ZERO:
        try:
            await _request_wake(runtime, k, resource_id, reason)
        except CapacityExceeded:
            if strict:
                raise
            log.info("wake-up waits for capacity", kind=k.name, id=resource_id)
            return status
        await runtime.kick_controller()
    return status


async def _status(runtime: Runtime, k: Kind, resource_id: str) -> Status:
    async with runtime.db.session() as s:
        raw = (await s.execute(select(k.model.status).where(k.model.id == resource_id))).scalar_one_or_none()
    if raw is None:
        raise NotFound(k.name, resource_id)
    return Status(raw)


async def _request_wake(runtime: Runtime, k: Kind, resource_id: str, reason: str = "woken by a request") -> None:
    """SCALED_TO_ZERO -> WAKING_UP under the org's capacity lock; CapacityExceeded (and a
    status reason on the row that says so) when the org has no room for it."""
    try:
        async with runtime.db.transaction() as s:
            org_id = (await s.execute(select(k.model.org_id).where(k.model.id == resource_id))).scalar_one_or_none()
            if org_id is None:
                return
            async with reserving(s, CapacityPolicy.of(runtime.settings, runtime.catalog), org_id):
                row = await k.locked(s, resource_id)
                if row is not None and row.status == Status.SCALED_TO_ZERO.value:
                    history.transition(s, k.name, row, Status.WAKING_UP, reason)
    except CapacityExceeded as exc:
        await _note_waiting(runtime, k, resource_id, f"waiting for capacity to wake up: {exc.message}")
        raise


async def _note_waiting(runtime: Runtime, k: Kind, resource_id: str, reason: str) -> None:
    async with runtime.db.transaction() as s:
        row = await k.locked(s, resource_id)
        if row is not None and row.status == Status.SCALED_TO_ZERO.value and row.status_reason != reason:
            row.status_reason = reason


async def _wait_active(runtime: Runtime, k: Kind, resource_id: str, pubsub: PubSub, deadline: float) -> None:
    me = f"{k.name}:{resource_id}".encode()
    while True:
        status = await _status(runtime, k, resource_id)
        if status == Status.ACTIVE:
            return
        if status in TERMINAL or status == Status.DEACTIVATING:
            reason = await _reason(runtime, k, resource_id)
            raise Unavailable(
                f"{k.name} {resource_id!r} could not be woken up: {status.value}" + (f" ({reason})" if reason else "")
            )
        if status == Status.SCALED_TO_ZERO:  # scaled down again before it woke (or never woken)
            await _request_wake(runtime, k, resource_id)
            await runtime.kick_controller()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WakeTimeout(
                f"{k.name} {resource_id!r} was scaled to zero and is still waking up "
                f"(status {status.value}); retry shortly"
            )
        await _next_message(pubsub, me, min(RECHECK_SECONDS, remaining))


async def _next_message(pubsub: PubSub, me: bytes, timeout: float) -> None:
    """Wait up to ``timeout`` for a notification about ``me`` (others are skipped)."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if msg is not None and msg.get("data") == me:
            return
        if msg is None:  # get_message may return early without a message: do not spin
            await asyncio.sleep(min(0.05, max(0.0, end - time.monotonic())))


async def _reason(runtime: Runtime, k: Kind, resource_id: str) -> str | None:
    async with runtime.db.session() as s:
        return (await s.execute(select(k.model.status_reason).where(k.model.id == resource_id))).scalar_one_or_none()
