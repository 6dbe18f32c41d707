"""Rows that own exactly one workload each: deployments (a trainer) and served models (a vLLM
server). Runs own none: they execute on their deployment's trainer (:mod:`.runs`).

One pass over one row reads it without a lock, talks to the backend, and then writes any
transition with a compare-and-set (row locked, status still the one it acted on), so no row
lock is held while the backend is slow and a concurrent API write (deactivation, a wake-up)
always wins. Per status:

* DEPLOYING / WAKING_UP: ensure the workload (idempotent; every pass until it is up, so a
  half-created one is completed), scale it up when it is scaled down; a permanent backend
  error, or transient ones beyond the retry budget (:mod:`.retry`), make it DEPLOY_FAILED with
  the error as the reason. Rows past that are only observed (no API write per pass).
* LOADING_MODEL / ACTIVE / UNHEALTHY / UPDATING: observe and map (FAILED with the reason). A
  vanished served model is recreated (back to DEPLOYING). A trainer that exited or vanished is
  restarted (WAKING_UP, the reason in the history row) and its run resumes from its snapshot
  and op log; :mod:`.resume` fails it after ``run_resume_max_attempts`` deaths at the same op.
  A trainer that was up and whose pod went away (the Deployment waits for a new one) is
  WAKING_UP too, its old worker's state dropped, until the worker on the new pod is READY.
  A trainer whose base model failed to load is FAILED at once. A deployment is ACTIVE only
  once its worker reports READY through Redis, and while it is live the controller tells its
  worker which run to execute (an attach event, whenever the worker's run differs from
  ``active_run_id``).
* ACTIVE served models and deployments idle for ``scale_down_delay_seconds`` (a deployment:
  no op of its run, none waiting) become SCALED_TO_ZERO (history row), then the workload is
  scaled to 0 replicas (a trainer snapshots its run as it stops); SCALED_TO_ZERO keeps it
  there, and wakes a trainer whose run has ops waiting.
* WAKING_UP (set by a request, :mod:`control_plane.scaling.wake`) becomes ACTIVE once the
  workload is ready again; waiting requests are notified.
* DEACTIVATING: remove the workload, INACTIVE once it is gone.
* A served model records its server's ``endpoint`` while it serves (the API proxies to it) and
  the first time it does, its checkpoints are verified against the trainer
  (:mod:`control_plane.sampling.served_verify`, in the background).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import select

from control_plane.controller import resume
from control_plane.controller.retry import BackendRetry
from control_plane.controller.served_model_spec import adapters_of, served_model_spec
from control_plane.controller.workloads import snapshot_prefix, trainer_spec
from control_plane.db.models import Deployment, Run, Sampler, ServedModel
from control_plane.runtime import Runtime
from control_plane.sampling.served_verify import verify_served_model
from control_plane.scaling.idle import scale_down_if_idle
from control_plane.scaling.kinds import DEPLOYMENT, SERVED_MODEL, Kind
from control_plane.scaling.wake import notify_woken, request_wake
from control_plane.scheduler.protocol import (
    Capacity,
    Observation,
    Phase,
    TransientBackendError,
    WorkloadRole,
    WorkloadSpec,
)
from control_plane.services import history
from control_plane.settings import BackendKind
from control_plane.statuses import LIVE, TERMINAL, Status
from control_plane.training.queue import read_hash
from data_plane.wire import queue as q

log = structlog.get_logger("openloops.controller")

PHASE_STATUS = {
    Phase.PENDING: Status.DEPLOYING,
    Phase.STARTING: Status.LOADING_MODEL,
    Phase.READY: Status.ACTIVE,
    Phase.UNHEALTHY: Status.UNHEALTHY,
    Phase.SCALED_DOWN: Status.SCALED_TO_ZERO,
}
STARTING_UP = frozenset({Status.DEPLOYING, Status.WAKING_UP})
TRAINER_UP = frozenset({Status.ACTIVE, Status.UNHEALTHY})  # its worker said READY


class RowReconciler:
    def __init__(self, runtime: Runtime, retry: BackendRetry) -> None:
        assert runtime.backend is not None
        self.r = runtime
        self.backend = runtime.backend
        self.retry = retry
        self._specs: dict[tuple[str, str], WorkloadSpec] = {}
        self._verifying: dict[str, asyncio.Task[str]] = {}  # served model id -> its verification
        self._warned_spot_unplaced = False

    async def reconcile_all(self, kind: Kind) -> None:
        async with self.r.db.session() as s:
            ids = list(
                (
                    await s.execute(select(kind.model.id).where(kind.model.status.notin_([x.value for x in TERMINAL])))
                ).scalars()
            )
        for rid in ids:
            try:
                await self.reconcile(kind, rid)
            except Exception as exc:  # one row must not stop the others
                log.exception("reconcile failed", kind=kind.name, id=rid, error=str(exc))

    async def reconcile(self, kind: Kind, rid: str) -> None:
        async with self.r.db.session() as s:
            row = await kind.get(s, rid)
        if row is None or Status(row.status) in TERMINAL:
            return
        status = Status(row.status)
        key = (kind.name, rid)
        if not self.retry.due(key):
            return  # backing off after a transient backend error
        if status == Status.DEACTIVATING:
            await self._teardown(kind, row)
        elif status == Status.SCALED_TO_ZERO:
            await self._keep_scaled_down(kind, row)
        elif status in LIVE:
            await self._live(kind, row, status)

    # --- live rows ----------------------------------------------------------------------

    async def _live(self, kind: Kind, row: Any, status: Status) -> None:
        key = (kind.name, row.id)
        try:
            obs = await self.backend.observe(row.id, kind.owned_role)
        except TransientBackendError as exc:
            self.retry.failed(key, exc)  # observing never fails the row: only back off
            log.warning("observe failed; retrying later", kind=kind.name, id=row.id, error=str(exc))
            return
        acted = False
        if kind is DEPLOYMENT and await self._trainer_died(row, status, obs):
            return  # restarting it (WAKING_UP) or out of attempts (FAILED)
        if kind is DEPLOYMENT and await self._trainer_pod_replaced(row, status, obs):
            return  # WAKING_UP until the worker on the new pod says READY
        if obs.phase == Phase.ABSENT and status not in STARTING_UP and kind is not DEPLOYMENT:
            # gone (a node lost, a local control plane restarted): a served model is stateless
            if not await self._transition(
                kind, row.id, status, Status.DEPLOYING, "workload disappeared; recreating it"
            ):
                return
            status = Status.DEPLOYING
        if status in STARTING_UP:
            # ensure on every pass while starting: it also completes a half-created workload
            # (e.g. a Deployment whose Service a crashed controller never made)
            if not await self._attempt(
                kind, row, status, f"start the {kind.owned_role.value}", lambda: self._ensure(kind, row)
            ):
                return
            acted = True
        if status == Status.WAKING_UP and obs.phase == Phase.SCALED_DOWN:
            if kind is DEPLOYMENT:
                await self._forget_worker(row.id)  # READY must come from the new worker
            wake = lambda: self.backend.scale(row.id, kind.owned_role, 1)  # noqa: E731
            if not await self._attempt(kind, row, status, f"wake the {kind.owned_role.value}", wake):
                return
            acted = True
        if acted:
            obs = await self.backend.observe(row.id, kind.owned_role)
        target = await self._target(kind, row, status, obs)
        if target is not None:
            to, reason = target
            await self._transition(kind, row.id, status, to, reason, endpoint=obs.endpoint)
            status = to
        if kind is DEPLOYMENT and status in LIVE:
            await self._ensure_attached(row)
        if kind is SERVED_MODEL:
            await self._served_model_endpoint(row, status, obs)
        if status == Status.ACTIVE and kind.scales_to_zero:
            await self._maybe_scale_down(kind, row)

    async def _served_model_endpoint(self, row: ServedModel, status: Status, obs: Observation) -> None:
        """Record where a served model's server answers while it serves (the API proxies to
        it), and verify its checkpoints the first time it does."""
        endpoint = obs.endpoint if status in (Status.ACTIVE, Status.UNHEALTHY) else None
        if endpoint != row.endpoint and status.value == row.status:  # moved without a transition
            async with self.r.db.transaction() as s:
                locked = await SERVED_MODEL.locked(s, row.id)
                if locked is None or locked.status != status.value:
                    return
                assert isinstance(locked, ServedModel)
                locked.endpoint = endpoint
        if endpoint is not None and row.verification == "pending" and row.id not in self._verifying:
            task = asyncio.create_task(verify_served_model(self.r, row.id, endpoint))
            self._verifying[row.id] = task
            task.add_done_callback(functools.partial(self._verified, row.id))

    async def close(self) -> None:
        """Stop background verifications (a later leader verifies what is still pending)."""
        tasks = list(self._verifying.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _verified(self, served_model_id: str, task: asyncio.Task[str]) -> None:
        self._verifying.pop(served_model_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("served model verification failed", error=repr(exc))

    async def _trainer_died(self, dep: Deployment, status: Status, obs: Observation) -> bool:
        """A deployment's trainer exited or vanished: restart it so that its run resumes from
        its snapshot and op log (:mod:`.resume` bounds the attempts). False when there is
        nothing to do here: the trainer lives, is just being started, or failed to load its
        base model (permanent: the row fails the usual way)."""
        if obs.phase not in (Phase.FAILED, Phase.ABSENT) or (obs.phase == Phase.ABSENT and status in STARTING_UP):
            return False
        if (await self._worker_state(dep.id)).get("state") == q.WorkerState.FAILED.value:
            return False
        died = obs.reason or "the trainer workload disappeared"
        decision = await resume.decide(
            self.r.redis, dep.id, dep.active_run_id, died, self.r.settings.run_resume_max_attempts
        )
        if not decision.resume:
            await self._fail(DEPLOYMENT, dep.id, status, Status.FAILED, decision.reason)
            return True
        try:
            await self.backend.remove(dep.id, WorkloadRole.TRAINER)  # what is left of the dead one
        except TransientBackendError as exc:
            self.retry.failed((DEPLOYMENT.name, dep.id), exc)
            log.warning("could not clear a dead trainer; retrying later", id=dep.id, error=str(exc))
            return True
        await self._forget_worker(dep.id)
        if await self._transition(DEPLOYMENT, dep.id, status, Status.WAKING_UP, decision.reason[:2000]):
            log.warning("trainer died; resuming", id=dep.id, run_id=dep.active_run_id, reason=decision.reason)
        return True

    async def _trainer_pod_replaced(self, dep: Deployment, status: Status, obs: Observation) -> bool:
        """The pod of a trainer that was up went away (a spot preemption, a node drain, a
        deletion) and its Deployment waits for the replacement (PENDING: no pod runs). The
        ReplicaSet makes the new pod by itself (nothing to recreate); its worker restores the
        run, so the deployment is WAKING_UP until that worker says READY. The gone worker's
        state is dropped first: the READY it left behind when it was killed must not make the
        new pod ACTIVE before its worker has loaded anything. Not counted as a death
        (:mod:`.resume`): the trainer did not fail, it was taken away."""
        if status not in TRAINER_UP or obs.phase != Phase.PENDING:
            return False
        await self._forget_worker(dep.id)
        resumes = (
            f"run {dep.active_run_id} resumes on the new pod from its snapshot and op log"
            if dep.active_run_id
            else "the trainer restarts on a new pod"
        )
        reason = f"the trainer pod went away ({obs.reason}); {resumes}"
        if await self._transition(DEPLOYMENT, dep.id, status, Status.WAKING_UP, reason[:2000]):
            log.warning("trainer pod went away; resuming", id=dep.id, run_id=dep.active_run_id, reason=reason)
        return True

    async def _forget_worker(self, deployment_id: str) -> None:
        """Drop a gone worker's state (its READY must not count for the one that replaces it)."""
        await self.r.redis.delete(q.worker_state_key(deployment_id))

    async def _ensure_attached(self, dep: Deployment) -> None:
        """Tell the deployment's worker to execute ``active_run_id`` unless the last attach
        event already says so (the worker ignores a repeated one)."""
        run_id = dep.active_run_id
        if run_id is None:
            return
        stream = q.deployment_runs_stream(dep.id)
        last = q.stream_entries(await self.r.redis.xrevrange(stream, count=1))
        if last and last[0][1].get(b"run_id", b"").decode() == run_id:
            return
        async with self.r.db.session() as s:
            found = (await s.execute(select(Run.max_seq_len, Run.org_id).where(Run.id == run_id))).one_or_none()
        if found is None:
            return
        max_len, org_id = found
        event = q.AttachEvent(run_id=run_id, max_seq_len=max_len, snapshot_prefix=snapshot_prefix(org_id, run_id))
        await self.r.redis.xadd(stream, event.to_fields(), maxlen=100, approximate=True)
        log.info("attaching run to deployment", deployment_id=dep.id, run_id=run_id)

    async def _ensure(self, kind: Kind, row: Any) -> None:
        spec_key = (kind.name, row.id)
        spec = self._specs.get(spec_key)
        if spec is None:
            spec = self._specs[spec_key] = await self._spec(kind, row)
        await self.backend.ensure(spec)

    async def _spec(self, kind: Kind, row: Any) -> WorkloadSpec:
        if kind is DEPLOYMENT:
            spec = trainer_spec(self.r, row)
            self._warn_if_spot_unplaced(spec)
            return spec
        async with self.r.db.session() as s:
            adapters = await adapters_of(s, row.id)
        return served_model_spec(self.r, row, adapters)

    def _warn_if_spot_unplaced(self, spec: WorkloadSpec) -> None:
        """Once per controller: a spot workload on Kubernetes whose settings name no spot node
        selector or tolerations runs where a dedicated one would (the run goes on)."""
        st = self.r.settings
        if (
            self._warned_spot_unplaced
            or spec.capacity != Capacity.SPOT
            or st.backend != BackendKind.KUBERNETES
            or st.kubernetes.spot_configured
        ):
            return
        self._warned_spot_unplaced = True
        log.warning(
            "spot workload placed like a dedicated one: kubernetes.spot_node_selector and "
            "kubernetes.spot_tolerations are empty (helm: workloads.spot)",
            workload_id=spec.workload_id,
            role=spec.role.value,
        )

    async def _attempt(
        self, kind: Kind, row: Any, status: Status, what: str, fn: Callable[[], Awaitable[None]]
    ) -> bool:
        """Run a backend action that a starting row needs; False when it did not happen
        (retried on a later pass, or the row is now DEPLOY_FAILED)."""
        key = (kind.name, row.id)
        try:
            await fn()
        except TransientBackendError as exc:
            give_up = self.retry.failed(key, exc)
            if give_up is None:
                log.warning(
                    "backend unavailable; retrying later",
                    kind=kind.name,
                    id=row.id,
                    action=what,
                    attempt=self.retry.attempts_of(key),
                    error=str(exc),
                )
                return False
            await self._fail(kind, row.id, status, Status.DEPLOY_FAILED, f"could not {what}: {give_up}")
            return False
        except Exception as exc:  # noqa: BLE001 - invalid spec, forbidden, unknown model: retrying cannot help
            self.retry.succeeded(key)
            await self._fail(kind, row.id, status, Status.DEPLOY_FAILED, f"could not {what}: {exc}")
            return False
        self.retry.succeeded(key)
        return True

    async def _target(self, kind: Kind, row: Any, status: Status, obs: Observation) -> tuple[Status, str | None] | None:
        """The status ``obs`` calls for, or None to keep the current one."""
        if obs.phase == Phase.FAILED:
            return Status.FAILED, await self._failure_reason(kind, row, obs)
        if obs.phase == Phase.ABSENT:
            if status in STARTING_UP:
                return None  # just ensured; the next observation will see it
            # a trainer whose run executed ops took its LoRA weights and optimizer state with it
            return Status.FAILED, await self._failure_reason(kind, row, obs)
        if status == Status.WAKING_UP and kind is DEPLOYMENT:
            # the trainer is back once its new worker says so (it restores the run on attach)
            ready = (await self._worker_state(row.id)).get("state") == q.WorkerState.READY.value
            return (Status.ACTIVE, "trainer is back") if ready and obs.phase in (Phase.STARTING, Phase.READY) else None
        if status == Status.WAKING_UP:
            return (Status.ACTIVE, "woke up") if obs.phase == Phase.READY else None
        if kind is DEPLOYMENT and obs.phase in (Phase.STARTING, Phase.READY):
            # a trainer has no HTTP endpoint: it reports its own readiness through Redis
            state = await self._worker_state(row.id)
            ready = state.get("state") == q.WorkerState.READY.value
            return (Status.ACTIVE if ready else Status.LOADING_MODEL), obs.reason
        return PHASE_STATUS[obs.phase], obs.reason

    async def _failure_reason(self, kind: Kind, row: Any, obs: Observation) -> str:
        reason = obs.reason or f"{kind.owned_role.value} workload disappeared"
        if kind is DEPLOYMENT:
            state = await self._worker_state(row.id)
            if state.get("state") == q.WorkerState.FAILED.value and state.get("detail"):
                reason = f"{state['detail']} ({reason})"
        return reason[:2000]

    async def _worker_state(self, deployment_id: str) -> dict[str, str]:
        return await read_hash(self.r.redis, q.worker_state_key(deployment_id))

    async def _run_state(self, run_id: str) -> dict[str, str]:
        return await read_hash(self.r.redis, q.run_state_key(run_id))

    # --- writes (compare-and-set) ---------------------------------------------------------

    async def _transition(
        self, kind: Kind, rid: str, expected: Status, to: Status, reason: str | None, *, endpoint: str | None = None
    ) -> bool:
        """Compare-and-set ``expected`` -> ``to``; a served model's ``endpoint`` is written in the
        same transaction (kept only while it serves), so no reader sees it ACTIVE without one."""
        async with self.r.db.transaction() as s:
            row = await kind.locked(s, rid)
            if row is None or row.status != expected.value:
                return False  # changed under us (deactivated, woken): the next pass decides
            changed = history.transition(s, kind.name, row, to, reason)
            if isinstance(row, ServedModel):
                row.endpoint = endpoint if to in (Status.ACTIVE, Status.UNHEALTHY) else None
        if to in TERMINAL:
            self._specs.pop((kind.name, rid), None)
        if changed and expected == Status.WAKING_UP:
            await notify_woken(self.r.redis, kind, rid)
        return changed

    async def _fail(self, kind: Kind, rid: str, expected: Status, to: Status, reason: str) -> None:
        reason = reason[:2000]
        if await self._transition(kind, rid, expected, to, reason):
            log.warning("workload failed", kind=kind.name, id=rid, status=to.value, reason=reason)

    # --- scale to zero ---------------------------------------------------------------------

    async def _maybe_scale_down(self, kind: Kind, seen: Any) -> None:
        if kind is DEPLOYMENT and await self._ops_waiting(seen.active_run_id):
            return  # an op in flight or queued is activity, however long it takes
        rid = seen.id
        async with self.r.db.transaction() as s:
            row = await kind.locked(s, rid)
            if row is None or not await scale_down_if_idle(s, self.r.redis, kind, row, datetime.now(UTC)):
                return
        log.info("scaling to zero", kind=kind.name, id=rid, reason=row.status_reason)
        await self._keep_scaled_down(kind, row)

    async def _ops_waiting(self, run_id: str | None) -> bool:
        """Whether a deployment's run (its ``active_run_id``) has ops its trainer has not
        answered yet."""
        return run_id is not None and bool(await self.r.redis.scard(q.run_pending_key(run_id)))

    async def _keep_scaled_down(self, kind: Kind, row: Any) -> None:
        """SCALED_TO_ZERO: make sure nothing runs (also finishes a scale-down that failed). A
        trainer whose run has ops waiting wakes up (an op that arrived while it was going down:
        the request path only wakes what it saw asleep)."""
        key = (kind.name, row.id)
        if kind is DEPLOYMENT and await self._ops_waiting(row.active_run_id):
            await request_wake(self.r, "deployment", row.id, f"woken by an op waiting on run {row.active_run_id}")
            return
        try:
            obs = await self.backend.observe(row.id, kind.owned_role)
            if obs.phase not in (Phase.SCALED_DOWN, Phase.ABSENT):
                await self.backend.scale(row.id, kind.owned_role, 0)
        except TransientBackendError as exc:
            self.retry.failed(key, exc)  # keep trying: the row already says SCALED_TO_ZERO
            log.warning("scale to zero failed; retrying later", kind=kind.name, id=row.id, error=str(exc))
            return
        self.retry.succeeded(key)

    # --- deactivation --------------------------------------------------------------------

    async def _teardown(self, kind: Kind, row: Any) -> None:
        key = (kind.name, row.id)
        try:
            await self.backend.remove(row.id, kind.owned_role)
            obs = await self.backend.observe(row.id, kind.owned_role)
        except TransientBackendError as exc:
            self.retry.failed(key, exc)  # keep trying: deactivation must finish eventually
            log.warning("remove failed; retrying later", kind=kind.name, id=row.id, error=str(exc))
            return
        self.retry.succeeded(key)
        if obs.phase != Phase.ABSENT:
            return
        self._specs.pop(key, None)
        async with self.r.db.transaction() as s:
            locked = await kind.locked(s, row.id)
            if locked is None or locked.status != Status.DEACTIVATING.value:
                return
            history.transition(s, kind.name, locked, Status.INACTIVE, "deactivated")
            if isinstance(locked, ServedModel) and locked.sampler_id:
                smp = await s.get(Sampler, locked.sampler_id, with_for_update=True)
                if smp is not None:
                    history.request_deactivation(s, "sampler", smp, f"served model {locked.id} deactivated")
