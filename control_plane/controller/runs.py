"""Run statuses, derived from the deployment a run executes on and from its worker's report.

A run owns no workload. Each pass moves every non-terminal run:

* DEACTIVATING -> INACTIVE (its deployment, when the run was what it executed, was asked to
  stop in the same transaction: :func:`control_plane.services.runs.end_run`);
* replaced on its deployment by a newer run (``active_run_id`` differs) -> INACTIVE;
* deployment stopped -> INACTIVE, deployment failed -> FAILED (with the deployment's reason);
* the worker reports the run failed (e.g. its snapshot is unreadable) -> FAILED;
* the worker restores the run (a restarted trainer: snapshot, then op log) -> WAKING_UP;
* deployment ACTIVE and the worker executes this run -> ACTIVE; otherwise the run shows where
  its deployment is (DEPLOYING, LOADING_MODEL, UNHEALTHY).

A run that becomes INACTIVE or FAILED gets its pending futures failed (nothing will complete
them), and its op log and snapshots are deleted. Transitions are compare-and-set (row locked, status unchanged), like every controller
write.
"""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy import select

from control_plane.controller.workloads import snapshot_prefix
from control_plane.db.models import Deployment, Run
from control_plane.runtime import Runtime
from control_plane.services import history
from control_plane.statuses import TERMINAL, Status
from control_plane.training.queue import TrainerQueue, read_hash
from data_plane.wire import queue as q

log = structlog.get_logger("openloops.controller.runs")

ENDED = frozenset({Status.INACTIVE, Status.FAILED})
# what a run shows while its deployment is in one of these statuses
FOLLOWS = {
    Status.DEPLOYING: Status.DEPLOYING,
    Status.WAKING_UP: Status.WAKING_UP,  # its trainer restarts (scale from zero, or after it died)
    Status.LOADING_MODEL: Status.LOADING_MODEL,
    Status.UPDATING: Status.LOADING_MODEL,
    Status.UNHEALTHY: Status.UNHEALTHY,
    Status.SCALED_TO_ZERO: Status.SCALED_TO_ZERO,
}


class RunReconciler:
    def __init__(self, runtime: Runtime) -> None:
        self.r = runtime
        self.queue = TrainerQueue(runtime.redis)

    async def reconcile(self) -> None:
        async with self.r.db.session() as s:
            rows = list(
                (
                    await s.execute(
                        select(Run, Deployment)
                        .outerjoin(Deployment, Deployment.id == Run.deployment_id)
                        .where(Run.status.notin_([x.value for x in TERMINAL]))
                    )
                ).all()
            )
        for run, dep in rows:
            try:
                await self._reconcile(run, dep)
            except Exception as exc:  # one run must not stop the others
                log.exception("run reconcile failed", run_id=run.id, error=str(exc))

    async def _reconcile(self, run: Run, dep: Deployment | None) -> None:
        target = await self._target(run, dep)
        if target is None:
            return
        to, reason = target
        if not await self._transition(run.id, Status(run.status), to, reason):
            return
        if to in ENDED:
            # nothing will complete the run's waiting ops any more
            why = f"trainer worker failed: {reason}" if to == Status.FAILED else f"run {run.id} is {to.value}: {reason}"
            await self.queue.end_run(run.id, why)
            await self._drop_durable_state(run)

    async def _drop_durable_state(self, run: Run) -> None:
        """An ended run never resumes: its op log and snapshots go (checkpoints stay). Its
        worker, if one is still draining, no longer owns it, so it writes no further snapshot."""
        await self.r.redis.hset(q.run_state_key(run.id), "owner", "ended")
        await self.r.redis.delete(q.ops_stream(run.id))
        try:
            await asyncio.to_thread(self.r.store.delete_prefix, snapshot_prefix(run.org_id, run.id) + "/")
        except Exception as exc:  # noqa: BLE001 - garbage only: never block the transition on it
            log.warning("could not delete the snapshots of an ended run", run_id=run.id, error=str(exc))

    async def _target(self, run: Run, dep: Deployment | None) -> tuple[Status, str | None] | None:
        status = Status(run.status)
        if status == Status.DEACTIVATING:
            return Status.INACTIVE, run.status_reason or "deactivated"
        if dep is None:
            return Status.FAILED, "its deployment no longer exists"
        if dep.active_run_id != run.id:
            return Status.INACTIVE, f"replaced by run {dep.active_run_id} on deployment {dep.id}"
        dep_status = Status(dep.status)
        if dep_status in (Status.INACTIVE, Status.DEACTIVATING):
            return Status.INACTIVE, f"deployment {dep.id} was stopped"
        if dep_status in TERMINAL:
            return Status.FAILED, f"deployment {dep.id} failed: {dep.status_reason or dep.status}"
        state = await read_hash(self.r.redis, q.run_state_key(run.id))
        if state.get("state") == q.RunState.FAILED.value:
            return Status.FAILED, state.get("detail") or "the trainer could not execute this run"
        if state.get("state") == q.RunState.RESTORING.value:
            return Status.WAKING_UP, (
                f"the trainer restores the run's snapshot and replays its op log up to seq "
                f"{int(state.get('next_seq') or 1) - 1}"
            )
        if dep_status == Status.ACTIVE:
            worker = await read_hash(self.r.redis, q.worker_state_key(dep.id))
            attached = worker.get("run_id") == run.id and state.get("state") == q.RunState.ATTACHED.value
            return (
                (Status.ACTIVE, None) if attached else (Status.LOADING_MODEL, "waiting for the trainer to take the run")
            )
        follows = FOLLOWS.get(dep_status)
        return (follows, dep.status_reason) if follows is not None else None

    async def _transition(self, run_id: str, expected: Status, to: Status, reason: str | None) -> bool:
        async with self.r.db.transaction() as s:
            row = (await s.execute(select(Run).where(Run.id == run_id).with_for_update())).scalar_one_or_none()
            if row is None or row.status != expected.value:
                return False  # changed under us: the next pass decides
            return history.transition(s, "run", row, to, reason[:2000] if reason else None)
