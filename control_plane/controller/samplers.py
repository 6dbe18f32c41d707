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
3. shared workloads of base models without live rows are removed.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import structlog
from sqlalchemy import select

from control_plane.controller.workloads import is_sampler_workload_id, sampler_spec, sampler_workload_id
from control_plane.db.models import Sampler, Session
from control_plane.runtime import Runtime
from control_plane.scheduler.protocol import Observation, Phase, WorkloadRole, WorkloadSpec
from control_plane.services import history
from control_plane.statuses import LIVE, SessionStatus, Status
from control_plane.training.queue import TrainerQueue

log = structlog.get_logger("openloops.controller.samplers")

SERVING = frozenset({Status.ACTIVE, Status.UNHEALTHY})


def pending_group(workload_id: str) -> str:
    """The pending-futures group (``TrainerQueue`` run id) of a shared sampler workload."""
    return workload_id


class SamplerReconciler:
    def __init__(self, runtime: Runtime) -> None:
        assert runtime.backend is not None
        self.r = runtime
        self.backend = runtime.backend
        self.queue = TrainerQueue(runtime.redis)
        self._specs: dict[str, WorkloadSpec] = {}

    async def reconcile(self) -> None:
        await self._stop_rows()
        async with self.r.db.session() as s:
            live = list(
                (
                    await s.execute(select(Sampler.base_model).where(Sampler.status.in_([x.value for x in LIVE])).distinct())
                ).scalars()
            )
        wanted = {sampler_workload_id(m): m for m in live}
        for wid, base_model in wanted.items():
            try:
                await self._reconcile_model(wid, base_model)
            except Exception as exc:  # one model must not stop the others
                log.exception("sampler reconcile failed", base_model=base_model, error=str(exc))
        for wid, role in await self.backend.list_workloads():
            if role == WorkloadRole.SAMPLER and is_sampler_workload_id(wid) and wid not in wanted:
                log.info("removing idle shared sampler", workload_id=wid)
                await self.backend.remove(wid, role)
                self._specs.pop(wid, None)

    async def _stop_rows(self) -> None:
        async with self.r.db.transaction() as s:
            ended = select(Session.id).where(Session.status != SessionStatus.ACTIVE.value)
            rows = (
                await s.execute(
                    select(Sampler)
                    .where(
                        (Sampler.status == Status.DEACTIVATING.value)
                        | (
                            Sampler.status.in_([x.value for x in LIVE])
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
        ensure_error: str | None = None
        try:
            await self.backend.ensure(self._spec(wid, base_model))
        except Exception as exc:
            ensure_error = f"could not start the sampler for {base_model}: {exc}"
        obs = await self.backend.observe(wid, WorkloadRole.SAMPLER)
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
                for smp in rows:
                    self._apply(s, smp, obs)
        if ensure_error is not None or obs.phase == Phase.FAILED:
            reason = ensure_error or obs.reason or "sampler exited"
            n = await self.queue.fail_pending(pending_group(wid), f"sampler for {base_model} failed: {reason}")
            log.warning("shared sampler failed", workload_id=wid, reason=reason, failed_futures=n)
            await self.backend.remove(wid, WorkloadRole.SAMPLER)
            self._specs.pop(wid, None)

    def _apply(self, s, smp: Sampler, obs: Observation) -> None:  # type: ignore[no-untyped-def]
        current = Status(smp.status)
        if obs.phase == Phase.FAILED:
            history.transition(s, "sampler", smp, Status.FAILED, (obs.reason or "sampler exited")[:2000])
            smp.endpoint = None
            return
        if obs.phase == Phase.READY:
            target, reason = Status.ACTIVE, None
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
