"""Standalone and paired samplers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.catalog import ModelCatalog
from control_plane.controller.workloads import sampler_workload_id
from control_plane.db.models import Checkpoint, Sampler
from control_plane.errors import Gone, InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.services import history
from control_plane.services.runs import get_run, resolve_weights_checkpoint
from control_plane.services.scoping import list_scope_filter
from control_plane.services.sessions import get_session
from control_plane.statuses import TERMINAL, SessionStatus, Status
from data_plane.sampler.names import adapter_name_for_prefix


@dataclass(frozen=True)
class SamplerRequest:
    session_id: str | None
    base_model: str | None = None
    run_id: str | None = None
    max_seq_length: int | None = None
    model_path: str | None = None
    origin: str = "loops"
    sampler_id: str | None = None


async def create_sampler(
    s: AsyncSession, principal: Principal, catalog: ModelCatalog, req: SamplerRequest
) -> Sampler:
    session_id = None
    if req.session_id is not None:
        session = await get_session(s, principal, req.session_id)
        if session.status != SessionStatus.ACTIVE.value:
            raise InvalidInput(f"session {session.id!r} is {session.status}", field="session_id")
        session_id = session.id
    base_model = req.base_model
    run_id = None
    if req.run_id:
        try:
            run = await get_run(s, principal, req.run_id)
        except NotFound as exc:
            raise InvalidInput(f"run {req.run_id!r} not found", field="run_id") from exc
        if base_model and base_model != run.base_model:
            raise InvalidInput(
                f"base_model {base_model!r} differs from the run's {run.base_model!r}", field="base_model"
            )
        base_model, run_id = run.base_model, run.id
    checkpoint_id = None
    if req.model_path:
        ckpt = await resolve_weights_checkpoint(
            s, principal, req.model_path, field="model_path", kind="sampler_weights"
        )
        if base_model and base_model != ckpt.base_model:
            raise InvalidInput(
                f"checkpoint {req.model_path!r} belongs to {ckpt.base_model}, not {base_model}",
                field="model_path",
            )
        base_model, checkpoint_id = ckpt.base_model, ckpt.id
    if not base_model:
        raise InvalidInput("one of base_model, run_id or model_path is required", field="base_model")
    model = catalog.get(base_model)
    if not model.sampleable:
        raise InvalidInput(f"base model {base_model!r} cannot be sampled", field="base_model")
    max_len = req.max_seq_length if req.max_seq_length is not None else model.max_context_length
    if not 1 <= max_len <= model.max_context_length:
        raise InvalidInput(
            f"max_seq_length must be between 1 and {model.max_context_length}", field="max_seq_length"
        )
    now = datetime.now(UTC)
    smp = Sampler(
        id=req.sampler_id or new_id("smp"),
        org_id=principal.org_id,
        created_by=principal.principal_id,
        session_id=session_id,
        run_id=run_id,
        origin=req.origin,
        base_model=model.name,
        model_path=req.model_path,
        checkpoint_id=checkpoint_id,
        max_seq_length=max_len,
        status=Status.DEPLOYING.value,
        created_at=now,
        updated_at=now,
    )
    s.add(smp)
    history.initial(s, "sampler", smp, "created")
    await s.flush()
    return smp


async def get_sampler(s: AsyncSession, principal: Principal, sampler_id: str) -> Sampler:
    smp = await s.get(Sampler, sampler_id)
    if smp is None or smp.org_id != principal.org_id:
        raise NotFound("sampler", sampler_id)
    return smp


async def list_samplers(s: AsyncSession, principal: Principal, *, scope: str | None = None) -> list[Sampler]:
    q = (
        select(Sampler)
        .where(*list_scope_filter(Sampler, principal, scope))
        .order_by(Sampler.created_at.desc(), Sampler.id.desc())
    )
    return list((await s.execute(q)).scalars())


async def deactivate_sampler(s: AsyncSession, principal: Principal, sampler_id: str) -> Sampler:
    smp = await get_sampler(s, principal, sampler_id)
    if history.request_deactivation(s, "sampler", smp, "deactivation requested"):
        await s.flush()
    return smp


@dataclass(frozen=True, slots=True)
class SamplerTarget:
    """Where and as what a sampler row is served right now."""

    sampler_id: str
    org_id: str
    base_model: str
    model: str  # the name sent to vLLM: the base model's served name or an adapter's LoRA name
    status: Status
    status_reason: str | None
    endpoint: str | None
    workload_id: str
    follows_run: bool  # a run-paired sampler serving that run's latest sampler weights

    @property
    def serving(self) -> bool:
        return self.status in (Status.ACTIVE, Status.UNHEALTHY) and self.endpoint is not None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL or self.status == Status.DEACTIVATING


async def latest_sampler_checkpoint(s: AsyncSession, run_id: str) -> Checkpoint | None:
    q = (
        select(Checkpoint)
        .where(Checkpoint.run_id == run_id, Checkpoint.kind == "sampler_weights")
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
        .limit(1)
    )
    return (await s.execute(q)).scalar_one_or_none()


async def sampler_target(s: AsyncSession, org_id: str, sampler_id: str) -> SamplerTarget:
    """Resolve what ``sampler_id`` serves: a pinned checkpoint's adapter, its run's latest
    sampler weights (Loops paired samplers follow training), or the base model."""
    smp = await s.get(Sampler, sampler_id)
    if smp is None or smp.org_id != org_id:
        raise NotFound("sampler", sampler_id)
    model = smp.base_model
    follows = False
    if smp.checkpoint_id is not None:
        ckpt = await s.get(Checkpoint, smp.checkpoint_id)
        if ckpt is None:
            raise Gone(f"the checkpoint {smp.model_path or smp.checkpoint_id} of sampler {smp.id!r} was deleted")
        model = adapter_name_for_prefix(ckpt.storage_prefix)
    elif smp.run_id is not None and smp.model_path is None:
        follows = True
        latest = await latest_sampler_checkpoint(s, smp.run_id)
        if latest is not None:
            model = adapter_name_for_prefix(latest.storage_prefix)
    return SamplerTarget(
        sampler_id=smp.id,
        org_id=smp.org_id,
        base_model=smp.base_model,
        model=model,
        status=Status(smp.status),
        status_reason=smp.status_reason,
        endpoint=smp.endpoint,
        workload_id=sampler_workload_id(smp.base_model),
        follows_run=follows,
    )
