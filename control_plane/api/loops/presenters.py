"""Rows → Loops API answers (the types of :mod:`control_plane.api.loops.responses`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.api.loops.responses import (
    Creator,
    Deactivated,
    DeactivatedUser,
    DeploymentStatus,
    LegacyCheckpoint,
    LoopsCheckpoint,
    LoopsDeployment,
    LoopsRun,
    LoopsSampler,
    OpenAIModel,
    OpenAIModelList,
    ServedCheckpoint,
    ServedModelOut,
    StatusOut,
)
from control_plane.db.models import Checkpoint, Deployment, Run, Sampler, ServiceAccount, User
from control_plane.db.reader import Row
from control_plane.services.deployments import loops_status
from control_plane.services.hot_reads import RunView
from control_plane.services.served_models import Served


def trainer_base_url(base_url: str, deployment_id: str) -> str:
    """Where the Loops SDK talks to a deployment's trainer (the trainer data plane)."""
    return f"{base_url}/v1/loops/deployments/{deployment_id}/trainer"


def served_model_base_url(base_url: str, served_model_id: str) -> str:
    """The root of a served model's OpenAI-compatible API (what an OpenAI client takes)."""
    return f"{base_url}/v1/loops/served_models/{served_model_id}/openai/v1"


def sampler_base_url(base_url: str, sampler_id: str) -> str:
    """Where the Loops SDK samples (``/sample``, ``/v1/completions``, ``/v1/models``, ...)."""
    return f"{base_url}/v1/loops/samplers/{sampler_id}/sync"


async def principal_names(s: AsyncSession, ids: set[str]) -> dict[str, Creator]:
    out: dict[str, Creator] = {}
    users = [i for i in ids if i.startswith("usr-")]
    sas = [i for i in ids if i.startswith("sa-")]
    if users:
        for u in (await s.execute(select(User.id, User.email).where(User.id.in_(users)))).all():
            out[u.id] = user_json(u.id, email=u.email)
    if sas:
        for sa in (
            await s.execute(select(ServiceAccount.id, ServiceAccount.name).where(ServiceAccount.id.in_(sas)))
        ).all():
            out[sa.id] = user_json(sa.id, service_account=sa.name)
    return out


def user_json(pid: str, *, email: str | None = None, service_account: str | None = None) -> Creator:
    """The ``user`` object of a resource: its creator (a user, a service account, or an id
    whose row is gone)."""
    if service_account is None:
        return Creator(id=pid, email=email)
    return Creator(id=pid, email=email, service_account=service_account)


def _user(users: dict[str, Creator], pid: str) -> Creator:
    return users.get(pid) or user_json(pid)


def sampler_json(smp: Sampler | Row, base_url: str, users: dict[str, Creator]) -> LoopsSampler:
    return LoopsSampler(
        id=smp.id,
        base_url=sampler_base_url(base_url, smp.id),
        base_model=smp.base_model,
        created_at=smp.created_at,
        model_id=smp.id,
        deployment_id=smp.id,
        status=StatusOut(name=smp.status, reason=smp.status_reason),
        user=_user(users, smp.created_by),
        run_id=smp.run_id,
        session_id=smp.session_id,
        model_path=smp.model_path,
        node_count=1,
    )


def run_json(run: Run | Row, sampler: Sampler | Row | None, base_url: str, users: dict[str, Creator]) -> LoopsRun:
    return LoopsRun(
        id=run.id,
        session_id=run.session_id,
        base_model=run.base_model,
        base_url=trainer_base_url(base_url, run.deployment_id) if run.deployment_id else None,
        created_at=run.created_at,
        sampler=sampler_json(sampler, base_url, users) if sampler else None,
        name=run.name,
        user=_user(users, run.created_by),
        status=StatusOut(name=run.status, reason=run.status_reason),
        deployment_id=run.deployment_id,
        max_seq_len=run.max_seq_len,
        lora_rank=run.lora_rank,
        seed=run.seed,
        scale_down_delay_seconds=run.scale_down_delay_seconds,
        availability_model=run.availability_model,
        replicas=run.replicas,
        base_checkpoint=run.base_checkpoint,
        activation_checkpointing=run.activation_checkpointing,
    )


def run_view_json(view: RunView, base_url: str) -> LoopsRun:
    """``run_json`` of a run read in one statement (services/hot_reads.py)."""
    creator = view.run.created_by
    users = {creator: user_json(creator, email=view.creator_email, service_account=view.creator_service_account)}
    return run_json(view.run, view.sampler, base_url, users)


def lora_adapter_config(lora: dict[str, Any] | None) -> dict[str, Any] | None:
    """A checkpoint's LoRA settings as Loops names them (``r`` is the rank)."""
    if not lora:
        return None
    out: dict[str, Any] = {"r": lora.get("rank"), **lora}
    if "alpha" in lora:
        out["lora_alpha"] = lora["alpha"]
    return out


def _checkpoint_fields(c: Checkpoint | Row) -> dict[str, Any]:
    return dict(
        id=c.id,
        checkpoint_id=c.name,
        checkpoint_type="lora",
        created_at=c.created_at,
        base_model=c.base_model,
        lora_adapter_config=lora_adapter_config(c.lora_config),
        size_bytes=c.size_bytes,
        sync_status=c.sync_status,
        run_id=c.run_id,
        target="sampler" if c.kind == "sampler_weights" else "trainer",
        checkpoint_path=f"bt://loops:{c.run_id}/{c.kind}/{c.name}",
        tinker_path=f"tinker://{c.run_id}/{c.kind}/{c.name}",
    )


def checkpoint_json(c: Checkpoint | Row) -> LoopsCheckpoint:
    return LoopsCheckpoint(**_checkpoint_fields(c))


def legacy_checkpoint_json(c: Checkpoint | Row) -> LegacyCheckpoint:
    """A checkpoint as the legacy ``/v1/trainer_sessions`` routes show it (with ``trainer_id``)."""
    return LegacyCheckpoint(**_checkpoint_fields(c), trainer_id=c.run_id)


def deployment_json(d: Deployment, base_url: str, users: dict[str, Creator]) -> LoopsDeployment:
    """A Loops deployment (``LoopsDeploymentV1``)."""
    return LoopsDeployment(
        id=d.id,
        base_model=d.base_model,
        base_url=trainer_base_url(base_url, d.id),
        status=DeploymentStatus(name=loops_status(d), reason=d.status_reason, detail=d.status),
        active_run_id=d.active_run_id,
        latest_run_id=d.latest_run_id,
        user=_user(users, d.created_by),
        created_at=d.created_at,
        availability_model=d.availability_model,
        instance_type=d.instance_type,
        node_count=d.node_count,
        replicas=d.replicas,
        name=d.name,
    )


def deactivated_json(row_id: str, base_model: str, users: dict[str, Creator], pid: str) -> Deactivated:
    return Deactivated(id=row_id, base_model=base_model, user=DeactivatedUser(email=_user(users, pid).email))


def served_model_json(x: Served, base_url: str, users: dict[str, Creator]) -> ServedModelOut:
    sm = x.model
    return ServedModelOut(
        id=sm.id,
        model_id=sm.id,
        deployment_id=sm.id,
        name=sm.name,
        base_model=sm.base_model,
        base_url=served_model_base_url(base_url, sm.id),
        status=StatusOut(name=sm.status, reason=sm.status_reason),
        checkpoints=[
            ServedCheckpoint(
                checkpoint_id=c.checkpoint_id,
                model=c.model_name,
                max_abs_delta=c.max_abs_delta,
                verification=c.verify_detail,
            )
            for c in x.checkpoints
        ],
        verification=sm.verification,
        verified_at=sm.verified_at,
        instance_type_id=sm.instance_type_id,
        hf_secret_name=sm.hf_secret_name,
        scale_down_delay_seconds=sm.scale_down_delay_seconds,
        last_request_at=sm.last_request_at,
        user=_user(users, sm.created_by),
        created_at=sm.created_at,
    )


def openai_models_json(x: Served) -> OpenAIModelList:
    """A served model's OpenAI ``/models``: each checkpoint by name, then the base model."""
    base = x.model.base_model
    created = int(x.model.created_at.timestamp())
    return OpenAIModelList(
        object="list",
        data=[
            OpenAIModel(
                id=n,
                object="model",
                created=created,
                owned_by="openloops",
                root=base,
                parent=None if n == base else base,
            )
            for n in x.model_names()
        ],
    )
