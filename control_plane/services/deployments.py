"""Loops deployments: the dedicated trainer workload that runs execute on.

Every run is created on a deployment (``run.deployment_id``): a new one, or, with
``reuse_from_run_id``, the deployment of an earlier run while it is live (the warm trainer
keeps its base model loaded and takes the new run; the run it served becomes INACTIVE). One
run executes on a deployment at a time (``active_run_id``). The controller starts the
deployment's trainer workload and tells its worker which run to execute
(:mod:`control_plane.controller.lifecycle`); the run's status follows
(:mod:`control_plane.controller.runs`).

Statuses use the shared vocabulary internally; the Loops API presents them in its own terms
(:data:`LOOPS_STATUS`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.db.models import Deployment, Run
from control_plane.errors import NotFound
from control_plane.ids import new_id
from control_plane.services import history
from control_plane.services.scoping import org_list_filter
from control_plane.statuses import LIVE, TERMINAL, Status

RESOURCE = "deployment"

# LoopsDeploymentStatusV1: CREATED, DEPLOYING, RUNNING, FAILED, STOPPED, SCALED_TO_ZERO, PREEMPTED
LOOPS_STATUS = {
    Status.BUILDING: "CREATED",
    Status.DEPLOYING: "DEPLOYING",
    Status.LOADING_MODEL: "DEPLOYING",
    Status.UPDATING: "DEPLOYING",
    Status.ACTIVE: "RUNNING",
    Status.UNHEALTHY: "RUNNING",
    Status.WAKING_UP: "DEPLOYING",
    Status.SCALED_TO_ZERO: "SCALED_TO_ZERO",
    Status.DEACTIVATING: "STOPPED",
    Status.INACTIVE: "STOPPED",
    Status.FAILED: "FAILED",
    Status.DEPLOY_FAILED: "FAILED",
    Status.BUILD_FAILED: "FAILED",
    Status.BUILD_STOPPED: "STOPPED",
}


def loops_status(dep: Deployment) -> str:
    return LOOPS_STATUS.get(Status(dep.status), "FAILED")


def new_deployment(principal: Principal, run: Run, *, max_seq_len: int) -> Deployment:
    """The deployment a new run executes on (the caller adds both rows)."""
    now = datetime.now(UTC)
    return Deployment(
        id=new_id("dep"),
        org_id=principal.org_id,
        created_by=principal.principal_id,
        base_model=run.base_model,
        name=run.name,
        status=Status.DEPLOYING.value,
        active_run_id=run.id,
        latest_run_id=run.id,
        availability_model=run.availability_model,
        replicas=run.replicas,
        max_seq_len=max_seq_len,
        scale_down_delay_seconds=run.scale_down_delay_seconds,
        created_at=now,
        updated_at=now,
    )


def reusable(dep: Deployment, run: Run) -> str | None:
    """Why ``run`` cannot go on ``dep`` (None when it can): the deployment must be live and
    built for the same model, availability and replica count, and long enough."""
    if Status(dep.status) not in LIVE:
        return f"deployment {dep.id} is {loops_status(dep)}"
    if dep.base_model != run.base_model:
        return f"deployment {dep.id} trains {dep.base_model}, not {run.base_model}"
    if dep.availability_model != run.availability_model:
        return f"deployment {dep.id} runs on {dep.availability_model} capacity, not {run.availability_model}"
    if dep.replicas != run.replicas:
        return f"deployment {dep.id} has {dep.replicas} replica(s), not {run.replicas}"
    if run.max_seq_len > dep.max_seq_len:
        return f"deployment {dep.id} handles sequences up to {dep.max_seq_len} tokens, not {run.max_seq_len}"
    return None


async def take_over(s: AsyncSession, dep: Deployment, run: Run) -> list[str]:
    """Put ``run`` on the live deployment ``dep``; the run it served becomes INACTIVE.
    Returns the ids of the replaced runs (their pending ops must be failed after commit)."""
    replaced: list[str] = []
    if dep.active_run_id and dep.active_run_id != run.id:
        prev = await s.get(Run, dep.active_run_id, with_for_update=True)
        if prev is not None and Status(prev.status) not in TERMINAL:
            history.transition(s, "run", prev, Status.INACTIVE, f"replaced by run {run.id} on deployment {dep.id}")
            prev.deactivated_at = datetime.now(UTC)
            replaced.append(prev.id)
    dep.active_run_id = run.id
    dep.latest_run_id = run.id
    dep.updated_at = datetime.now(UTC)
    run.deployment_id = dep.id
    return replaced


async def release_run(s: AsyncSession, run: Run, reason: str) -> None:
    """A run is being torn down: when it is the run its deployment executes, the deployment
    stops too (nothing else can use its trainer until a new run reuses it, and an idle
    dedicated trainer would hold its GPUs)."""
    if run.deployment_id is None:
        return
    dep = await s.get(Deployment, run.deployment_id, with_for_update=True)
    if dep is not None and dep.active_run_id == run.id and history.request_deactivation(s, RESOURCE, dep, reason):
        dep.deactivated_at = datetime.now(UTC)


async def get_deployment(s: AsyncSession, principal: Principal, deployment_id: str) -> Deployment:
    dep = await s.get(Deployment, deployment_id)
    if dep is None or dep.org_id != principal.org_id:
        raise NotFound("deployment", deployment_id)
    return dep


async def list_deployments(s: AsyncSession, principal: Principal, *, scope: str | None = None) -> list[Deployment]:
    q = (
        select(Deployment)
        .where(*org_list_filter(Deployment, principal, scope))
        .order_by(Deployment.created_at.desc(), Deployment.id.desc())
    )
    return list((await s.execute(q)).scalars())


async def deactivate_deployment(s: AsyncSession, principal: Principal, deployment_id: str) -> Deployment:
    """Stop the deployment's trainer; its runs become INACTIVE once it is gone (the
    controller finishes both), its checkpoints stay."""
    dep = await get_deployment(s, principal, deployment_id)
    if history.request_deactivation(s, RESOURCE, dep, "deactivation requested"):
        dep.deactivated_at = datetime.now(UTC)
        await s.flush()
    return dep
