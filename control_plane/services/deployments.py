"""Deployments: a checkpoint served by a long-lived sampler."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.db.models import Checkpoint, Deployment, DeploymentRequestBucket
from control_plane.errors import InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.services import history
from control_plane.services.scoping import list_scope_filter
from control_plane.statuses import Status

# upper bounds (ms) of the latency histogram buckets; one overflow bucket follows
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
MAX_METRIC_POINTS = 2000


async def create_deployment(
    s: AsyncSession, principal: Principal, checkpoint: Checkpoint, *, name: str | None = None,
    scale_down_delay_seconds: int = 3600,
) -> Deployment:
    if checkpoint.kind != "sampler_weights":
        raise InvalidInput("only sampler_weights checkpoints can be deployed", field="checkpoint_id")
    now = datetime.now(UTC)
    dep = Deployment(
        id=new_id("dep"),
        org_id=principal.org_id,
        created_by=principal.principal_id,
        base_model=checkpoint.base_model,
        name=name or checkpoint.name,
        status=Status.DEPLOYING.value,
        checkpoint_id=checkpoint.id,
        latest_run_id=checkpoint.run_id,
        scale_down_delay_seconds=scale_down_delay_seconds,
        created_at=now,
        updated_at=now,
    )
    s.add(dep)
    history.initial(s, "deployment", dep, f"deploying checkpoint {checkpoint.id}")
    await s.flush()
    return dep


async def get_deployment(s: AsyncSession, principal: Principal, deployment_id: str) -> Deployment:
    dep = await s.get(Deployment, deployment_id)
    if dep is None or dep.org_id != principal.org_id:
        raise NotFound("deployment", deployment_id)
    return dep


async def list_deployments(s: AsyncSession, principal: Principal, *, scope: str | None = None) -> list[Deployment]:
    # manage_org_training_projects route: the whole org unless scope=own is asked for
    conds = [Deployment.org_id == principal.org_id]
    if scope == "own":
        conds = list_scope_filter(Deployment, principal, None)
    elif scope not in (None, "org"):
        raise InvalidInput(f"invalid scope {scope!r}: expected 'org' or 'own'", field="scope")
    q = select(Deployment).where(*conds).order_by(Deployment.created_at.desc(), Deployment.id.desc())
    return list((await s.execute(q)).scalars())


async def deactivate_deployment(s: AsyncSession, principal: Principal, deployment_id: str) -> Deployment:
    dep = await get_deployment(s, principal, deployment_id)
    if history.request_deactivation(s, "deployment", dep, "deactivation requested"):
        await s.flush()
    return dep


def _percentile(hist: list[int], q: float) -> float | None:
    total = sum(hist)
    if total == 0:
        return None
    target = q * total
    acc = 0
    for i, c in enumerate(hist):
        acc += c
        if acc >= target:
            return float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else float(LATENCY_BUCKETS_MS[-1])
    return float(LATENCY_BUCKETS_MS[-1])


async def deployment_metrics(
    s: AsyncSession,
    dep: Deployment,
    *,
    start_ms: int | None,
    end_ms: int | None,
    step_seconds: int | None,
) -> dict:
    end = datetime.fromtimestamp(end_ms / 1000, UTC) if end_ms is not None else datetime.now(UTC)
    start = datetime.fromtimestamp(start_ms / 1000, UTC) if start_ms is not None else end - timedelta(hours=1)
    if start >= end:
        raise InvalidInput("start_epoch_millis must be before end_epoch_millis", field="start_epoch_millis")
    step = step_seconds or 60
    if step < 60 or step % 60:
        raise InvalidInput("step_seconds must be a positive multiple of 60", field="step_seconds")
    if (end - start).total_seconds() / step > MAX_METRIC_POINTS:
        raise InvalidInput(f"the window holds more than {MAX_METRIC_POINTS} steps; raise step_seconds", field="step_seconds")
    rows = (
        await s.execute(
            select(DeploymentRequestBucket)
            .where(
                DeploymentRequestBucket.deployment_id == dep.id,
                DeploymentRequestBucket.bucket_start >= start,
                DeploymentRequestBucket.bucket_start < end,
            )
            .order_by(DeploymentRequestBucket.bucket_start)
        )
    ).scalars()
    steps: dict[int, dict] = {}
    for r in rows:
        idx = int((r.bucket_start - start).total_seconds() // step)
        agg = steps.setdefault(idx, {"c2": 0, "c4": 0, "c5": 0, "conc": 0, "hist": [0] * (len(LATENCY_BUCKETS_MS) + 1)})
        agg["c2"] += r.count_2xx
        agg["c4"] += r.count_4xx
        agg["c5"] += r.count_5xx
        agg["conc"] = max(agg["conc"], r.max_concurrent)
        for i, c in enumerate(r.latency_hist):
            agg["hist"][i] += c
    volume, conc, rt, by_status = [], [], [], []
    for idx in sorted(steps):
        a = steps[idx]
        ts = (start + timedelta(seconds=idx * step)).isoformat()
        volume.append({"timestamp": ts, "value": a["c2"] + a["c4"] + a["c5"]})
        conc.append({"timestamp": ts, "value": a["conc"]})
        rt.append({"timestamp": ts, "p50": _percentile(a["hist"], 0.5), "p95": _percentile(a["hist"], 0.95), "p99": _percentile(a["hist"], 0.99)})
        by_status.append({"timestamp": ts, "status_2xx": a["c2"], "status_4xx": a["c4"], "status_5xx": a["c5"]})
    return {
        "inference_volume": volume,
        "concurrent_requests": conc,
        "response_time_stats": rt,
        "inference_volume_by_status": by_status,
        "gpu_memory_usage_bytes": {},
        "gpu_utilization": {},
        "cpu_usage": [],
        "cpu_memory_usage_bytes": [],
        "ephemeral_storage": {"usage_bytes": [], "utilization": []},
        "per_node_metrics": [],
    }


async def record_request(
    s: AsyncSession, deployment_id: str, *, status_code: int, latency_ms: float, concurrent: int
) -> None:
    """Count one served request in its minute bucket."""
    from sqlalchemy.dialects.postgresql import insert

    now = datetime.now(UTC).replace(second=0, microsecond=0)
    empty = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    await s.execute(
        insert(DeploymentRequestBucket)
        .values(deployment_id=deployment_id, bucket_start=now, latency_hist=empty)
        .on_conflict_do_nothing()
    )
    row = (
        await s.execute(
            select(DeploymentRequestBucket)
            .where(DeploymentRequestBucket.deployment_id == deployment_id, DeploymentRequestBucket.bucket_start == now)
            .with_for_update()
        )
    ).scalar_one()
    cls = status_code // 100
    row.count_2xx += int(cls == 2)
    row.count_4xx += int(cls == 4)
    row.count_5xx += int(cls == 5)
    row.max_concurrent = max(row.max_concurrent, concurrent)
    idx = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if latency_ms <= b), len(LATENCY_BUCKETS_MS))
    hist = list(row.latency_hist)
    hist[idx] += 1
    row.latency_hist = hist
    await s.flush()
