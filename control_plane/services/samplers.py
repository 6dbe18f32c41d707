"""Standalone and paired samplers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.catalog import ModelCatalog
from control_plane.db.models import Checkpoint, Run, Sampler
from control_plane.errors import Gone, InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.services import history
from control_plane.services.runs import get_run, resolve_weights_checkpoint
from control_plane.services.scoping import list_scope_filter
from control_plane.services.sessions import get_session
from control_plane.statuses import TERMINAL, SessionStatus, Status
from data_plane.sampler.names import adapter_name_for_prefix

SAMPLER_WORKLOAD_PREFIX = "vllm-"


def sampler_workload_id(base_model: str) -> str:
    """The id of the vLLM workload that serves ``base_model`` and every adapter trained on it
    (one shared server per base model)."""
    slug = "".join(c if c.isalnum() else "-" for c in base_model.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(base_model.encode()).hexdigest()[:8]
    return f"{SAMPLER_WORKLOAD_PREFIX}{slug}-{digest}"


def is_sampler_workload_id(workload_id: str) -> bool:
    return workload_id.startswith(SAMPLER_WORKLOAD_PREFIX)


@dataclass(frozen=True)
class SamplerRequest:
    session_id: str | None
    base_model: str | None = None
    run_id: str | None = None
    max_seq_length: int | None = None
    model_path: str | None = None
    origin: str = "loops"
    sampler_id: str | None = None


async def create_sampler(s: AsyncSession, principal: Principal, catalog: ModelCatalog, req: SamplerRequest) -> Sampler:
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
        if not req.model_path:
            # a run's paired sampler is created once (the Loops SDK asks on first sample)
            existing = await live_paired_sampler(s, run.id)
            if existing is not None:
                return existing
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
        raise InvalidInput(f"max_seq_length must be between 1 and {model.max_context_length}", field="max_seq_length")
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


async def live_paired_sampler(s: AsyncSession, run_id: str) -> Sampler | None:
    """The run's paired sampler (serving its published weights) while it is not ended."""
    q = (
        select(Sampler)
        .where(
            Sampler.run_id == run_id,
            Sampler.model_path.is_(None),
            Sampler.status.notin_([x.value for x in TERMINAL | {Status.DEACTIVATING}]),
        )
        .order_by(Sampler.created_at.desc(), Sampler.id.desc())
        .limit(1)
    )
    return (await s.execute(q)).scalar_one_or_none()


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
    follows_run: bool  # a run-paired sampler serving the adapter its run published
    run_id: str | None = None
    version: int = 0  # the served adapter's policy version (0: the base model)
    # the run its sampling is counted for: the row's run, or the run of its pinned checkpoint
    metered_run_id: str | None = None
    adapter_label: str | None = None  # the served checkpoint's name (None: the base model)

    @property
    def serving(self) -> bool:
        return self.status in (Status.ACTIVE, Status.UNHEALTHY) and self.endpoint is not None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL or self.status == Status.DEACTIVATING


async def published_checkpoint(s: AsyncSession, run_id: str) -> tuple[Checkpoint | None, int]:
    """The adapter a run published for its paired sampler, and its policy version."""
    row = (
        await s.execute(
            select(Checkpoint, Run.policy_version)
            .select_from(Run)
            .outerjoin(Checkpoint, Checkpoint.id == Run.published_checkpoint_id)
            .where(Run.id == run_id)
        )
    ).first()
    if row is None:
        return None, 0
    return row[0], int(row[1] or 0)


async def sampler_target(s: AsyncSession, org_id: str, sampler_id: str) -> SamplerTarget:
    """Resolve what ``sampler_id`` serves: a pinned checkpoint's adapter, the adapter its run
    last published (Loops paired samplers follow training by policy version: a
    ``save_weights_for_sampler`` with ``bump_version``), or the base model."""
    smp = await s.get(Sampler, sampler_id)
    if smp is None or smp.org_id != org_id:
        raise NotFound("sampler", sampler_id)
    model = smp.base_model
    follows = False
    version = 0
    label = None
    metered = smp.run_id
    if smp.checkpoint_id is not None:
        ckpt = await s.get(Checkpoint, smp.checkpoint_id)
        if ckpt is None:
            raise Gone(f"the checkpoint {smp.model_path or smp.checkpoint_id} of sampler {smp.id!r} was deleted")
        model, version, label = adapter_name_for_prefix(ckpt.storage_prefix), ckpt.policy_version or 0, ckpt.name
        metered = metered or ckpt.run_id
    elif smp.run_id is not None and smp.model_path is None:
        follows = True
        published, version = await published_checkpoint(s, smp.run_id)
        if published is not None:
            model, label = adapter_name_for_prefix(published.storage_prefix), published.name
        else:
            version = 0
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
        run_id=smp.run_id,
        version=version,
        adapter_label=label,
        metered_run_id=metered,
    )
