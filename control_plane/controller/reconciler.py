"""The controller: moves statuses only from what the backend (and workers) report.

One active controller per deployment: it holds a Postgres advisory lock on a dedicated
connection; other replicas wait. Each pass ensures live workloads exist, observes them, writes
transitions (with history rows), tears down deactivated ones, expires idle Tinker sessions,
garbage-collects orphan workloads and flushes last-seen times.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import select, text, update

from control_plane.auth.authenticator import flush_last_seen
from control_plane.controller.sessions import expire_sessions, flush_session_heartbeats
from control_plane.controller.workloads import is_sampler_workload_id, trainer_spec
from control_plane.db.models import Deployment, Run, Sampler
from control_plane.runtime import RECONCILE_CHANNEL, Runtime
from control_plane.scheduler.protocol import Observation, Phase, WorkloadRole
from control_plane.services import history
from control_plane.statuses import LIVE, TERMINAL, Status
from control_plane.training.queue import TrainerQueue
from data_plane.wire import queue as q

log = structlog.get_logger("openloops.controller")
LOCK_KEY = 0x6F6C6F6F  # "oloo"

PHASE_STATUS = {
    Phase.PENDING: Status.DEPLOYING,
    Phase.STARTING: Status.LOADING_MODEL,
    Phase.READY: Status.ACTIVE,
    Phase.UNHEALTHY: Status.UNHEALTHY,
    Phase.SCALED_DOWN: Status.SCALED_TO_ZERO,
}


class Controller:
    def __init__(self, runtime: Runtime) -> None:
        assert runtime.backend is not None
        self.r = runtime
        self.backend = runtime.backend
        self.queue = TrainerQueue(runtime.redis)
        self._wake = asyncio.Event()
        self.is_leader = False
        self.passes = 0

    # --- leadership ---------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen())
        try:
            while not stop.is_set():
                async with self.r.db.engine.connect() as conn:
                    got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY})).scalar()
                    await conn.commit()
                    if not got:
                        self.is_leader = False
                        await self._sleep(stop, 2.0)
                        continue
                    self.is_leader = True
                    log.info("controller is leader")
                    try:
                        while not stop.is_set():
                            await self.reconcile_once()
                            await self._sleep(stop, self.r.settings.controller_interval_seconds)
                    finally:
                        self.is_leader = False
                        with contextlib.suppress(Exception):
                            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

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
            except Exception as exc:  # redis blip: resubscribe
                log.warning("reconcile listener error", error=str(exc))
                await asyncio.sleep(1.0)

    # --- one pass -----------------------------------------------------------------------

    async def reconcile_once(self) -> None:
        self.passes += 1
        for step in (self._runs, self._samplers, self._deployments, self._sessions, self._gc, self._flush):
            try:
                await step()
            except Exception as exc:  # one failing step must not stop the others
                log.exception("reconcile step failed", step=step.__name__, error=str(exc))

    async def _flush(self) -> None:
        await flush_last_seen(self.r.db, self.r.redis)
        await flush_session_heartbeats(self.r.db, self.r.redis)

    async def _sessions(self) -> None:
        expired = await expire_sessions(self.r.db, timedelta(seconds=self.r.settings.session_expiry_seconds))
        if expired:
            log.info("sessions expired", count=len(expired))

    async def _worker_state(self, run_id: str) -> dict[str, str]:
        raw = await self.r.redis.hgetall(q.worker_state_key(run_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def _runs(self) -> None:
        async with self.r.db.session() as s:
            rows = list(
                (await s.execute(select(Run).where(Run.status.notin_([x.value for x in TERMINAL])))).scalars()
            )
        for run in rows:
            await self._reconcile_run(run.id)

    async def _reconcile_run(self, run_id: str) -> None:
        async with self.r.db.transaction() as s:
            run = (await s.execute(select(Run).where(Run.id == run_id).with_for_update())).scalar_one_or_none()
            if run is None or Status(run.status) in TERMINAL:
                return
            status = Status(run.status)
            if status == Status.DEACTIVATING:
                await self.backend.remove(run.id, WorkloadRole.TRAINER)
                obs = await self.backend.observe(run.id, WorkloadRole.TRAINER)
                if obs.phase == Phase.ABSENT:
                    history.transition(s, "run", run, Status.INACTIVE, "deactivated")
                    await self.queue.fail_pending(run.id, f"run {run.id} was deactivated")
                return
            if status == Status.SCALED_TO_ZERO:
                return
            if status in LIVE:
                try:
                    await self.backend.ensure(trainer_spec(self.r, run))
                except Exception as exc:
                    history.transition(s, "run", run, Status.DEPLOY_FAILED, f"could not start trainer: {exc}")
                    await self.queue.fail_pending(run.id, f"trainer could not be started: {exc}")
                    return
            obs = await self.backend.observe(run.id, WorkloadRole.TRAINER)
            await self._apply_trainer_observation(s, run, obs)

    async def _apply_trainer_observation(self, s, run: Run, obs: Observation) -> None:  # type: ignore[no-untyped-def]
        if obs.phase in (Phase.FAILED, Phase.ABSENT):
            state = await self._worker_state(run.id)
            reason = obs.reason or "trainer workload disappeared"
            if state.get("state") == q.WorkerState.FAILED.value and state.get("detail"):
                reason = f"{state['detail']} ({reason})"
            history.transition(s, "run", run, Status.FAILED, reason)
            n = await self.queue.fail_pending(run.id, f"trainer worker failed: {reason}")
            log.warning("run failed", run_id=run.id, reason=reason, failed_futures=n)
            return
        target = PHASE_STATUS[obs.phase]
        if obs.phase in (Phase.STARTING, Phase.READY):
            # a trainer has no HTTP endpoint: it reports its own readiness through Redis
            state = await self._worker_state(run.id)
            target = Status.ACTIVE if state.get("state") == q.WorkerState.READY.value else Status.LOADING_MODEL
        if Status(run.status) != target:
            history.transition(s, "run", run, target, obs.reason)

    async def _samplers(self) -> None:
        """Samplers are served by one shared vLLM workload per base model; see
        control_plane/controller/samplers.py (statuses, deactivation, failures)."""
        from control_plane.controller.samplers import SamplerReconciler

        rec = self.__dict__.get("_sampler_reconciler")
        if rec is None:
            rec = self.__dict__["_sampler_reconciler"] = SamplerReconciler(self.r)
        await rec.reconcile()

    async def _deployments(self) -> None:
        async with self.r.db.transaction() as s:
            rows = list(
                (
                    await s.execute(
                        select(Deployment).where(Deployment.status == Status.DEACTIVATING.value).with_for_update()
                    )
                ).scalars()
            )
            for dep in rows:
                await self.backend.remove(dep.id, WorkloadRole.DEPLOYMENT)
                obs = await self.backend.observe(dep.id, WorkloadRole.DEPLOYMENT)
                if obs.phase == Phase.ABSENT:
                    history.transition(s, "deployment", dep, Status.INACTIVE, "deactivated")
                    if dep.sampler_id:
                        await s.execute(
                            update(Sampler)
                            .where(Sampler.id == dep.sampler_id, Sampler.status.notin_([x.value for x in TERMINAL]))
                            .values(status=Status.DEACTIVATING.value, updated_at=datetime.now(UTC))
                        )

    async def _gc(self) -> None:
        """Remove workloads whose rows are gone or terminal."""
        workloads = await self.backend.list_workloads()
        if not workloads:
            return
        tables = {WorkloadRole.TRAINER: Run, WorkloadRole.SAMPLER: Sampler, WorkloadRole.DEPLOYMENT: Deployment}
        async with self.r.db.session() as s:
            for wid, role in workloads:
                if role == WorkloadRole.SAMPLER and is_sampler_workload_id(wid):
                    continue  # shared per base model: SamplerReconciler owns its lifetime
                model = tables[role]
                row = await s.get(model, wid)
                if row is None or (Status(row.status) in TERMINAL and row.status != Status.FAILED.value):
                    log.info("garbage-collecting workload", workload_id=wid, role=role.value)
                    await self.backend.remove(wid, role)
                elif row.status == Status.FAILED.value:
                    await self.backend.remove(wid, role)
