"""Samplers: one shared vLLM workload per base model, statuses of every sampler row from it.

Each sampler row (Loops sampler, Tinker sampling session) only says *what* it serves (a base
model, a pinned checkpoint, or its run's latest sampler weights). The process that serves it is
the vLLM server of its base model, shared by every row of that model (adapters are loaded by
name, on first use, through the object-store resolver). One pass:

1. rows that must stop (DEACTIVATING, or a Tinker session that finished/expired) become
   INACTIVE: they no longer keep the workload alive;
2. for each base model with live rows: ensure the workload (a spec built once and kept, so a
   local server keeps its port), observe it, and move every live row of that model:
   PENDING -> DEPLOYING, STARTING -> LOADING_MODEL (UNHEALTHY when it had been serving),
   READY -> ACTIVE (with the endpoint), FAILED -> FAILED with the reason (its pending sampling
   futures are failed and the workload is removed, so a later row starts a fresh one);
3. shared workloads of base models without live rows are scaled to zero when some of their
   rows are SCALED_TO_ZERO (they may be woken), removed otherwise.

Scale to zero: an ACTIVE row idle for its ``scale_down_delay_seconds`` becomes SCALED_TO_ZERO
(the workload keeps serving its other rows); a request wakes it (WAKING_UP, see
:mod:`control_plane.scaling.wake`), which makes the model live again: the workload is scaled
back up if it was down, and the row is ACTIVE once it serves. Transient backend errors are
retried with backoff (:mod:`.retry`) before rows are DEPLOY_FAILED.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.controller.retry import BackendRetry
from control_plane.controller.workloads import sampler_spec
from control_plane.db.models import Sampler, Session
from control_plane.runtime import Runtime
from control_plane.scaling.idle import scale_down_if_idle
from control_plane.scaling.kinds import SAMPLER
from control_plane.scaling.wake import notify_woken
from control_plane.scheduler.protocol import Observation, Phase, TransientBackendError, WorkloadRole, WorkloadSpec
from control_plane.services import history
from control_plane.services.samplers import is_sampler_workload_id, sampler_workload_id
from control_plane.statuses import LIVE, SessionStatus, Status
from control_plane.training.queue import TrainerQueue

log = structlog.get_logger("openloops.controller.samplers")

SERVING = frozenset({Status.ACTIVE, Status.UNHEALTHY})


def pending_group(workload_id: str) -> str:
    """The pending-futures group (``TrainerQueue`` run id) of a shared sampler workload."""
    return workload_id


class SamplerReconciler:
    def __init__(self, runtime: Runtime, retry: BackendRetry | None = None) -> None:
        assert runtime.backend is not None
        self.r = runtime
        self.backend = runtime.backend
        self.retry = retry or BackendRetry.from_settings(runtime.settings)
        self.queue = TrainerQueue(runtime.redis)
        self._specs: dict[str, WorkloadSpec] = {}

    async def reconcile(self) -> None:
        await self._stop_rows()
        async with self.r.db.session() as s:
            live = list(
                (
                    await s.execute(
                        select(Sampler.base_model).where(Sampler.status.in_([x.value for x in LIVE])).distinct()
                    )
                ).scalars()
            )
            asleep = set(
                (
                    await s.execute(
                        select(Sampler.base_model).where(Sampler.status == Status.SCALED_TO_ZERO.value).distinct()
                    )
                ).scalars()
            )
        wanted = {sampler_workload_id(m): m for m in live}
        asleep_ids = {sampler_workload_id(m) for m in asleep}
        for wid, base_model in wanted.items():
            try:
                await self._reconcile_model(wid, base_model)
            except Exception as exc:  # one model must not stop the others
                log.exception("sampler reconcile failed", base_model=base_model, error=str(exc))
        for wid, role in await self.backend.list_workloads():
            if role == WorkloadRole.SAMPLER and is_sampler_workload_id(wid) and wid not in wanted:
                try:
                    await self._stop_workload(wid, keep=wid in asleep_ids)
                except TransientBackendError as exc:
                    log.warning("stopping shared sampler failed; retrying later", workload_id=wid, error=str(exc))

    async def _stop_workload(self, wid: str, *, keep: bool) -> None:
        """No live rows: scale to zero (rows that may wake it remain) or remove."""
        if not keep:
            log.info("removing idle shared sampler", workload_id=wid)
            await self.backend.remove(wid, WorkloadRole.SAMPLER)
            self._specs.pop(wid, None)
            return
        obs = await self.backend.observe(wid, WorkloadRole.SAMPLER)
        if obs.phase not in (Phase.SCALED_DOWN, Phase.ABSENT):
            log.info("scaling shared sampler to zero", workload_id=wid)
            await self.backend.scale(wid, WorkloadRole.SAMPLER, 0)

    async def _stop_rows(self) -> None:
        async with self.r.db.transaction() as s:
            ended = select(Session.id).where(Session.status != SessionStatus.ACTIVE.value)
            rows = (
                await s.execute(
                    select(Sampler)
                    .where(
                        (Sampler.status == Status.DEACTIVATING.value)
                        | (
                            Sampler.status.in_([x.value for x in LIVE | {Status.SCALED_TO_ZERO}])
                            & (Sampler.origin == "tinker")
                            & Sampler.session_id.in_(ended)
                        )
                    )
                    .with_for_update(skip_locked=True)
                )
            ).scalars()
            for smp in rows:
                if smp.status == Status.DEACTIVATING.value:
                    # rows of the earlier one-workload-per-sampler layout, if any
                    await self.backend.remove(smp.id, WorkloadRole.SAMPLER)
                    history.transition(s, "sampler", smp, Status.INACTIVE, "deactivated")
                else:
                    history.transition(s, "sampler", smp, Status.INACTIVE, "session ended")
                smp.endpoint = None

    def _spec(self, wid: str, base_model: str) -> WorkloadSpec:
        spec = self._specs.get(wid)
        if spec is None:
            spec = self._specs[wid] = sampler_spec(self.r, base_model)
        return spec

    async def _reconcile_model(self, wid: str, base_model: str) -> None:
        if not self.retry.due(wid):
            return  # backing off after a transient backend error
        ensure_error: str | None = None
        try:
            await self.backend.ensure(self._spec(wid, base_model))
            obs = await self.backend.observe(wid, WorkloadRole.SAMPLER)
            if obs.phase == Phase.SCALED_DOWN:  # live rows again (woken): scale back up
                await self.backend.scale(wid, WorkloadRole.SAMPLER, 1)
                obs = await self.backend.observe(wid, WorkloadRole.SAMPLER)
            self.retry.succeeded(wid)
        except TransientBackendError as exc:
            give_up = self.retry.failed(wid, exc)
            if give_up is None:
                log.warning("backend unavailable; retrying later", workload_id=wid, error=str(exc))
                return
            ensure_error = f"could not start the sampler for {base_model}: {give_up}"
        except Exception as exc:  # noqa: BLE001 - whatever stops the start is the sampler's failure reason
            ensure_error = f"could not start the sampler for {base_model}: {exc}"
        if ensure_error is not None:
            obs = Observation(wid, WorkloadRole.SAMPLER, Phase.FAILED, reason=ensure_error)
        woken: list[str] = []
        async with self.r.db.transaction() as s:
            rows = list(
                (
                    await s.execute(
                        select(Sampler)
                        .where(Sampler.base_model == base_model, Sampler.status.in_([x.value for x in LIVE]))
                        .with_for_update(skip_locked=True)
                    )
                ).scalars()
            )
            if ensure_error is not None:
                for smp in rows:
                    history.transition(s, "sampler", smp, Status.DEPLOY_FAILED, ensure_error[:2000])
                    smp.endpoint = None
            else:
                now = datetime.now(UTC)
                for smp in rows:
                    was = smp.status
                    self._apply(s, smp, obs)
                    if was == Status.WAKING_UP.value and smp.status != was:
                        woken.append(smp.id)
                    await scale_down_if_idle(s, self.r.redis, SAMPLER, smp, now)
        for sid in woken:
            await notify_woken(self.r.redis, SAMPLER, sid)
        if ensure_error is not None or obs.phase == Phase.FAILED:
            reason = ensure_error or obs.reason or "sampler exited"
            n = await self.queue.fail_pending(pending_group(wid), f"sampler for {base_model} failed: {reason}")
            log.warning("shared sampler failed", workload_id=wid, reason=reason, failed_futures=n)
            await self.backend.remove(wid, WorkloadRole.SAMPLER)
            self._specs.pop(wid, None)

    def _apply(self, s: AsyncSession, smp: Sampler, obs: Observation) -> None:
        current = Status(smp.status)
        if obs.phase == Phase.FAILED:
            history.transition(s, "sampler", smp, Status.FAILED, (obs.reason or "sampler exited")[:2000])
            smp.endpoint = None
            return
        if current == Status.WAKING_UP and obs.phase != Phase.READY:
            return  # stays WAKING_UP until it serves (requests wait for that)
        if obs.phase == Phase.READY:
            target, reason = Status.ACTIVE, ("woke up" if current == Status.WAKING_UP else None)
        elif obs.phase == Phase.UNHEALTHY or (obs.phase == Phase.STARTING and current in SERVING):
            target, reason = Status.UNHEALTHY, obs.reason or "sampler stopped answering its health check"
        elif obs.phase == Phase.STARTING:
            target, reason = Status.LOADING_MODEL, obs.reason
        else:  # PENDING / ABSENT (not created yet) / SCALED_DOWN
            target, reason = Status.DEPLOYING, obs.reason
        history.transition(s, "sampler", smp, target, reason)
        endpoint = obs.endpoint if target in SERVING else None
        if smp.endpoint != endpoint:
            smp.endpoint = endpoint
            smp.updated_at = datetime.now(UTC)
