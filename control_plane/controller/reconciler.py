"""The controller: moves statuses only from what the backend (and workers) report.

One active controller per deployment: it holds a Postgres advisory lock on a dedicated
connection, checks that connection before every pass and steps down when it is gone (the
server released the lock with it, so another replica may already lead); other replicas try
to take the lock every ``controller_lock_retry_seconds``. Each pass flushes request activity,
reconciles deployments and served models (:mod:`.lifecycle`), then runs (:mod:`.runs`, from
their deployments) and samplers (:mod:`.samplers`), expires idle Tinker sessions,
garbage-collects orphan workloads, deletes training metrics past their retention and flushes
last-seen times. Every step is idempotent, so a
pass cut short by a crash or a failover is simply done again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

import structlog
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.auth.authenticator import flush_last_seen
from control_plane.controller.lifecycle import RowReconciler
from control_plane.controller.retry import BackendRetry
from control_plane.controller.runs import RunReconciler
from control_plane.controller.samplers import SamplerReconciler
from control_plane.metering.usage import UsageSampler
from control_plane.runtime import RECONCILE_CHANNEL, Runtime
from control_plane.scaling.activity import flush_activity
from control_plane.scaling.kinds import DEPLOYMENT, KINDS, SERVED_MODEL
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.services.heartbeats import expire_sessions, flush_session_heartbeats
from control_plane.services.samplers import is_sampler_workload_id
from control_plane.statuses import TERMINAL, Status
from control_plane.telemetry.retention import prune_training_metrics

TELEMETRY_PRUNE_SECONDS = 60.0

log = structlog.get_logger("openloops.controller")
LOCK_KEY = 0x6F6C6F6F  # "oloo"
KIND_OF_ROLE = {k.role: k for k in KINDS.values() if k.role is not None}
WAKING_INTERVAL_SECONDS = 0.25  # pass interval while something is WAKING_UP (a request waits)


class Controller:
    def __init__(self, runtime: Runtime) -> None:
        assert runtime.backend is not None
        self.r = runtime
        self.backend = runtime.backend
        self.retry = BackendRetry.from_settings(runtime.settings)
        self.rows = RowReconciler(runtime, self.retry)
        self.runs = RunReconciler(runtime)
        self.samplers = SamplerReconciler(runtime, self.retry)
        self.usage = UsageSampler(runtime)
        self._wake = asyncio.Event()
        self.is_leader = False
        self.passes = 0
        self._metrics_pruned_at = float("-inf")

    # --- leadership ---------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen())
        try:
            while not stop.is_set():
                try:
                    await self._lead_while_possible(stop)
                except Exception as exc:  # noqa: BLE001 - database down: not leader; try again later
                    self.is_leader = False
                    log.warning("controller could not take or keep the lock", error=str(exc))
                if not stop.is_set():
                    await self._sleep(stop, self.r.settings.controller_lock_retry_seconds)
        finally:
            self.is_leader = False
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self.rows.close()

    async def _lead_while_possible(self, stop: asyncio.Event) -> None:
        async with self.r.db.engine.connect() as conn:
            got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY})).scalar()
            await conn.commit()
            if not got:
                self.is_leader = False
                return
            self.is_leader = True
            log.info("controller is leader")
            try:
                while not stop.is_set() and await self._still_leader(conn):
                    await self.reconcile_once()
                    await self._sleep(stop, await self._interval())
            finally:
                self.is_leader = False
                with contextlib.suppress(Exception):
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                    await conn.commit()
                log.info("controller stepped down")

    async def _interval(self) -> float:
        """The pass interval; shorter while a request waits for something to wake up."""
        interval = self.r.settings.controller_interval_seconds
        try:
            async with self.r.db.session() as s:
                for kind in KINDS.values():
                    if (
                        kind.scales_to_zero
                        and (
                            await s.execute(
                                select(kind.model.id).where(kind.model.status == Status.WAKING_UP.value).limit(1)
                            )
                        ).first()
                    ):
                        return min(interval, WAKING_INTERVAL_SECONDS)
        except Exception as exc:  # noqa: BLE001 - the next pass reports database trouble
            log.warning("could not check for waking resources", error=str(exc))
        return interval

    async def _still_leader(self, conn: AsyncConnection) -> bool:
        """The lock lives and dies with ``conn``: a pass starts only while it answers."""
        try:
            await conn.execute(text("SELECT 1"))
            await conn.commit()
            return True
        except Exception as exc:  # noqa: BLE001 - any failure of the lock connection means stepping down
            log.warning("controller lost its lock connection; stepping down", error=str(exc))
            self.is_leader = False
            return False

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        self._wake.clear()
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.r.redis.pubsub()
                await pubsub.subscribe(RECONCILE_CHANNEL)
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - redis blip: resubscribe
                log.warning("reconcile listener error", error=str(exc))
                await asyncio.sleep(1.0)

    # --- one pass -----------------------------------------------------------------------

    async def reconcile_once(self) -> None:
        self.passes += 1
        steps = (
            self._activity,
            self._deployments,
            self._runs,
            self._samplers,
            self._served_models,
            self._sessions,
            self._gc,
            self._usage,
            self._telemetry,
            self._flush,
        )
        for step in steps:
            try:
                await step()
            except Exception as exc:  # one failing step must not stop the others
                log.exception("reconcile step failed", step=step.__name__, error=str(exc))

    async def _activity(self) -> None:
        await flush_activity(self.r.db, self.r.redis)  # before anything decides what is idle

    async def _deployments(self) -> None:
        await self.rows.reconcile_all(DEPLOYMENT)

    async def _runs(self) -> None:
        await self.runs.reconcile()

    async def _samplers(self) -> None:
        await self.samplers.reconcile()

    async def _served_models(self) -> None:
        await self.rows.reconcile_all(SERVED_MODEL)

    async def _sessions(self) -> None:
        expired = await expire_sessions(self.r.db, timedelta(seconds=self.r.settings.session_expiry_seconds))
        if expired:
            log.info("sessions expired", count=len(expired))

    async def _gc(self) -> None:
        """Remove workloads whose rows are gone or terminal."""
        workloads = await self.backend.list_workloads()
        async with self.r.db.session() as s:
            for wid, role in workloads:
                if role == WorkloadRole.SAMPLER and is_sampler_workload_id(wid):
                    continue  # shared per base model: SamplerReconciler owns its lifetime
                row = await KIND_OF_ROLE[role].get(s, wid)
                if row is None or Status(row.status) in TERMINAL:
                    log.info(
                        "garbage-collecting workload",
                        workload_id=wid,
                        role=role.value,
                        status=row.status if row else None,
                    )
                    await self.backend.remove(wid, role)

    async def _usage(self) -> None:
        await self.usage.maybe_sample()

    async def _telemetry(self) -> None:
        """Training metrics past ``training_metrics_retention_days``: once a minute at most."""
        now = time.monotonic()
        if now - self._metrics_pruned_at < TELEMETRY_PRUNE_SECONDS:
            return
        self._metrics_pruned_at = now
        deleted = await prune_training_metrics(self.r.db, self.r.settings.training_metrics_retention_days)
        if deleted:
            log.info("training metrics past retention deleted", rows=deleted)

    async def _flush(self) -> None:
        await flush_last_seen(self.r.db, self.r.redis)
        await flush_session_heartbeats(self.r.db, self.r.redis)
