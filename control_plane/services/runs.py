"""Runs (trainer servers) and their paired samplers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.catalog import ModelCatalog
from control_plane.db.models import Checkpoint, Run, Sampler
from control_plane.errors import InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.services import history
from control_plane.services.scoping import list_scope_filter
from control_plane.services.sessions import get_session
from control_plane.statuses import SessionStatus, Status
from data_plane.wire.paths import PathError, parse_checkpoint_path

MAX_LORA_RANK = 512


@dataclass(frozen=True)
class RunRequest:
    session_id: str
    base_model: str
    name: str | None = None
    max_seq_len: int | None = None
    lora_rank: int = 64
    seed: int | None = None
    scale_down_delay_seconds: int | None = None
    availability_model: str = "dedicated"
    replicas: int = 1
    path: str | None = None
    with_sampler: bool = True
    # Tinker-only
    origin: str = "loops"
    run_id: str | None = None
    model_seq_id: int | None = None
    lora_config: dict[str, Any] | None = None
    user_metadata: dict[str, Any] | None = None


async def resolve_weights_checkpoint(
    s: AsyncSession, principal: Principal, path: str, *, field: str, kind: str = "weights"
) -> Checkpoint:
    try:
        ref = parse_checkpoint_path(path)
    except PathError as exc:
        raise InvalidInput(str(exc), field=field) from exc
    if ref.kind != kind:
        raise InvalidInput(f"{field} must point at a {kind} checkpoint, got {ref.kind}", field=field)
    ckpt = (
        await s.execute(
            select(Checkpoint).where(
                Checkpoint.run_id == ref.run_id,
                Checkpoint.kind == ref.kind,
                Checkpoint.name == ref.name,
                Checkpoint.org_id == principal.org_id,
            )
        )
    ).scalar_one_or_none()
    if ckpt is None:
        raise InvalidInput(f"checkpoint {path!r} not found", field=field)
    return ckpt


async def create_run(
    s: AsyncSession, principal: Principal, catalog: ModelCatalog, req: RunRequest, default_delay: int
) -> tuple[Run, Sampler | None]:
    session = await get_session(s, principal, req.session_id)
    if session.status != SessionStatus.ACTIVE.value:
        raise InvalidInput(f"session {session.id!r} is {session.status}", field="session_id")
    model = catalog.trainable(req.base_model)
    max_seq_len = req.max_seq_len if req.max_seq_len is not None else model.max_context_length
    if not 1 <= max_seq_len <= model.max_context_length:
        raise InvalidInput(
            f"max_seq_len must be between 1 and {model.max_context_length} for {model.name}",
            field="max_seq_len",
        )
    if not 1 <= req.lora_rank <= MAX_LORA_RANK:
        raise InvalidInput(f"lora_rank must be between 1 and {MAX_LORA_RANK}", field="lora_rank")
    delay = req.scale_down_delay_seconds if req.scale_down_delay_seconds is not None else default_delay
    if not 1 <= delay <= 3600:
        raise InvalidInput(
            "scale_down_delay_seconds must be between 1 and 3600", field="scale_down_delay_seconds"
        )
    if req.availability_model not in ("dedicated", "spot"):
        raise InvalidInput("availability_model must be 'dedicated' or 'spot'", field="availability_model")
    if req.replicas != 1:
        raise InvalidInput(
            "replicas > 1 (data-parallel trainers) is not supported by this server", field="replicas"
        )
    if req.path:
        ckpt = await resolve_weights_checkpoint(s, principal, req.path, field="path")
        if ckpt.base_model != model.name:
            raise InvalidInput(
                f"checkpoint {req.path!r} was trained on {ckpt.base_model}, not {model.name}",
                field="path",
            )
    now = datetime.now(UTC)
    run = Run(
        id=req.run_id or new_id("run"),
        org_id=principal.org_id,
        created_by=principal.principal_id,
        session_id=session.id,
        origin=req.origin,
        model_seq_id=req.model_seq_id,
        name=req.name or model.name,
        base_model=model.name,
        status=Status.DEPLOYING.value,
        lora_rank=req.lora_rank,
        lora_config=req.lora_config or {"rank": req.lora_rank, "seed": req.seed},
        seed=req.seed,
        max_seq_len=max_seq_len,
        scale_down_delay_seconds=delay,
        availability_model=req.availability_model,
        replicas=req.replicas,
        init_path=req.path,
        user_metadata=dict(req.user_metadata or {}),
        last_request_at=now,
        created_at=now,
        updated_at=now,
    )
    s.add(run)
    history.initial(s, "run", run, "created")
    sampler = None
    if req.with_sampler and model.sampleable:
        sampler = Sampler(
            id=new_id("smp"),
            org_id=principal.org_id,
            created_by=principal.principal_id,
            session_id=session.id,
            run_id=run.id,
            origin=req.origin,
            base_model=model.name,
            max_seq_length=max_seq_len,
            status=Status.DEPLOYING.value,
            created_at=now,
            updated_at=now,
        )
        s.add(sampler)
        history.initial(s, "sampler", sampler, "created with run")
    await s.flush()
    return run, sampler


async def get_run(s: AsyncSession, principal: Principal, run_id: str) -> Run:
    run = await s.get(Run, run_id)
    if run is None or run.org_id != principal.org_id:
        raise NotFound("run", run_id)
    return run


async def paired_sampler(s: AsyncSession, run_id: str) -> Sampler | None:
    q = (
        select(Sampler)
        .where(Sampler.run_id == run_id, Sampler.model_path.is_(None))
        .order_by(Sampler.created_at.desc(), Sampler.id.desc())
        .limit(1)
    )
    return (await s.execute(q)).scalar_one_or_none()


async def list_runs(
    s: AsyncSession,
    principal: Principal,
    *,
    run_id: str | None = None,
    base_model: str | None = None,
    scope: str | None = None,
) -> list[Run]:
    conds = list_scope_filter(Run, principal, scope)
    if run_id:
        conds.append(Run.id == run_id)
    if base_model:
        conds.append(Run.base_model == base_model)
    q = select(Run).where(*conds).order_by(Run.created_at.desc(), Run.id.desc())
    return list((await s.execute(q)).scalars())


async def samplers_by_run(s: AsyncSession, run_ids: list[str]) -> dict[str, Sampler]:
    if not run_ids:
        return {}
    q = (
        select(Sampler)
        .where(Sampler.run_id.in_(run_ids), Sampler.model_path.is_(None))
        .order_by(Sampler.created_at.asc())
    )
    return {smp.run_id: smp for smp in (await s.execute(q)).scalars() if smp.run_id}


async def deactivate_run(s: AsyncSession, principal: Principal, run_id: str) -> Run:
    """Tear down the run and its paired sampler; checkpoints stay accessible."""
    run = await get_run(s, principal, run_id)
    if history.request_deactivation(s, "run", run, "deactivation requested"):
        run.deactivated_at = datetime.now(UTC)
    for smp in (await s.execute(select(Sampler).where(Sampler.run_id == run.id))).scalars():
        history.request_deactivation(s, "sampler", smp, "run deactivated")
    await s.flush()
    return run
