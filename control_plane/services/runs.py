"""Runs (trainer servers) and their paired samplers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.catalog import ModelCatalog
from control_plane.db.models import Checkpoint, Deployment, Run, Sampler
from control_plane.errors import InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.services import deployments, history, run_options
from control_plane.services.scoping import list_scope_filter
from control_plane.services.sessions import get_session
from control_plane.statuses import SessionStatus, Status
from data_plane.wire.paths import PathError, parse_checkpoint_path

MAX_LORA_RANK = 512
# what a Loops run's adapter trains (Loops puts LoRA on attention and MLP, not the unembedding)
LOOPS_LORA_TARGETS = {"train_attn": True, "train_mlp": True, "train_unembed": False}


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
    base_checkpoint: str | None = None
    reuse_from_run_id: str | None = None
    reuse_from_session_id: str | None = None
    with_sampler: bool = True
    # auto | on | off (services/run_options.py); None: the server's default
    activation_checkpointing: str | None = None
    # Tinker-only
    origin: str = "loops"
    run_id: str | None = None
    model_seq_id: int | None = None
    lora_config: dict[str, Any] | None = None
    user_metadata: dict[str, Any] | None = None


async def resolve_weights_checkpoint(
    s: AsyncSession, principal: Principal, path: str, *, field: str, kind: str | tuple[str, ...] = "weights"
) -> Checkpoint:
    """The checkpoint at ``path`` (a tinker:// or bt://loops: path) of one of ``kind``, the
    org's own or one another org published; a 400 naming ``field`` otherwise."""
    try:
        ref = parse_checkpoint_path(path)
    except PathError as exc:
        raise InvalidInput(str(exc), field=field) from exc
    kinds = (kind,) if isinstance(kind, str) else kind
    if ref.kind not in kinds:
        raise InvalidInput(f"{field} must point at a {' or '.join(kinds)} checkpoint, got {ref.kind}", field=field)
    ckpt = (
        await s.execute(
            select(Checkpoint).where(
                Checkpoint.run_id == ref.run_id,
                Checkpoint.kind == ref.kind,
                Checkpoint.name == ref.name,
                or_(Checkpoint.org_id == principal.org_id, Checkpoint.public.is_(True)),
            )
        )
    ).scalar_one_or_none()
    if ckpt is None:
        raise InvalidInput(f"checkpoint {path!r} not found", field=field)
    return ckpt


@dataclass(frozen=True)
class CreatedRun:
    run: Run
    sampler: Sampler | None
    deployment: Deployment
    replaced_run_ids: list[str]  # runs that the new one took a warm deployment from


async def create_run(
    s: AsyncSession,
    principal: Principal,
    catalog: ModelCatalog,
    req: RunRequest,
    default_delay: int,
    max_replicas: int = 1,
) -> CreatedRun:
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
        raise InvalidInput("scale_down_delay_seconds must be between 1 and 3600", field="scale_down_delay_seconds")
    if req.availability_model not in ("dedicated", "spot"):
        raise InvalidInput("availability_model must be 'dedicated' or 'spot'", field="availability_model")
    if not 1 <= req.replicas <= max_replicas:
        raise InvalidInput(
            f"replicas must be between 1 and {max_replicas} on this server, got {req.replicas}", field="replicas"
        )
    checkpointing = run_options.check_activation_checkpointing(req.activation_checkpointing)
    if req.path:
        ckpt = await resolve_weights_checkpoint(s, principal, req.path, field="path")
        if ckpt.base_model != model.name:
            raise InvalidInput(
                f"checkpoint {req.path!r} was trained on {ckpt.base_model}, not {model.name}",
                field="path",
            )
    if req.base_checkpoint:
        if req.path:
            raise InvalidInput(
                "pass either path (resume a run) or base_checkpoint (start from a checkpoint), not both",
                field="base_checkpoint",
            )
        await resolve_base_checkpoint(s, principal, req.base_checkpoint, model.name, req.lora_rank)
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
        lora_config=req.lora_config or {"rank": req.lora_rank, "seed": req.seed, **LOOPS_LORA_TARGETS},
        seed=req.seed,
        max_seq_len=max_seq_len,
        scale_down_delay_seconds=delay,
        availability_model=req.availability_model,
        replicas=req.replicas,
        init_path=req.path,
        base_checkpoint=req.base_checkpoint or None,
        user_metadata=dict(req.user_metadata or {}),
        activation_checkpointing=checkpointing,
        last_request_at=now,
        created_at=now,
        updated_at=now,
    )
    dep, warm = await _deployment_for(s, principal, req, run, model.max_context_length)
    await s.flush()  # a new deployment row exists before the run points at it
    run.deployment_id = dep.id
    s.add(run)
    history.initial(s, "run", run, f"created on warm deployment {dep.id}" if warm else "created")
    await s.flush()
    replaced = await deployments.take_over(s, dep, run) if warm else []
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
    return CreatedRun(run, sampler, dep, replaced)


async def _deployment_for(
    s: AsyncSession, principal: Principal, req: RunRequest, run: Run, model_max_len: int
) -> tuple[Deployment, bool]:
    """The deployment ``run`` executes on: the warm one of ``reuse_from_run_id`` (or of the
    newest run of ``reuse_from_session_id``) when it is live and fits, else a new one. The
    bool says whether a warm one is reused."""
    prev = None
    if req.reuse_from_run_id:
        prev = await s.get(Run, req.reuse_from_run_id)
        if prev is None or prev.org_id != principal.org_id:
            raise InvalidInput(f"reuse_from_run_id: run {req.reuse_from_run_id!r} not found", field="reuse_from_run_id")
    elif req.reuse_from_session_id:
        prev = (
            await s.execute(
                select(Run)
                .where(Run.session_id == req.reuse_from_session_id, Run.org_id == principal.org_id)
                .order_by(Run.created_at.desc(), Run.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
    if prev is not None and prev.deployment_id is not None:
        if req.base_checkpoint:
            raise InvalidInput("base_checkpoint cannot be combined with reuse_from_run_id", field="base_checkpoint")
        dep = await s.get(Deployment, prev.deployment_id, with_for_update=True)
        if dep is not None and deployments.reusable(dep, run) is None:
            return dep, True
    dep = deployments.new_deployment(principal, run, max_seq_len=model_max_len)
    s.add(dep)
    history.initial(s, deployments.RESOURCE, dep, f"created for run {run.id}")
    return dep, False


async def resolve_base_checkpoint(
    s: AsyncSession, principal: Principal, path: str, base_model: str, lora_rank: int
) -> Checkpoint:
    """The org's checkpoint a new run's adapter starts from (its optimizer starts fresh)."""
    field = "base_checkpoint"
    if path.startswith("hf://"):
        raise InvalidInput(
            f"base_checkpoint {path!r}: Hugging Face checkpoints cannot be loaded by this server (it serves the "
            "models of its catalog); pass one of your checkpoints: bt://loops:<run_id>/weights/<name> or tinker://...",
            field=field,
        )
    ckpt = await resolve_weights_checkpoint(s, principal, path, field=field, kind=("weights", "sampler_weights"))
    if ckpt.base_model != base_model:
        raise InvalidInput(f"base_checkpoint {path!r} was trained on {ckpt.base_model}, not {base_model}", field=field)
    rank = int((ckpt.lora_config or {}).get("rank") or 0)
    if rank and rank != lora_rank:
        raise InvalidInput(
            f"base_checkpoint {path!r} is a rank-{rank} LoRA adapter: create the run with lora_rank={rank}", field=field
        )
    return ckpt


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
    """Tear down the run, its paired sampler and (when the run is what it executes) its
    deployment's trainer; checkpoints stay accessible."""
    run = await get_run(s, principal, run_id)
    await end_run(s, run, "deactivation requested")
    await s.flush()
    return run


async def end_run(s: AsyncSession, run: Run, reason: str) -> None:
    """Request the teardown of a run (the controller finishes it)."""
    if history.request_deactivation(s, "run", run, reason):
        run.deactivated_at = datetime.now(UTC)
        await deployments.release_run(s, run, f"run {run.id}: {reason}")
    for smp in (await s.execute(select(Sampler).where(Sampler.run_id == run.id))).scalars():
        history.request_deactivation(s, "sampler", smp, f"run {run.id} ended")
