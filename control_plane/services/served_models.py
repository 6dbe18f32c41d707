"""Served models: sampler checkpoints served as an OpenAI-compatible model by their own vLLM
server (not to be confused with Loops deployments, :mod:`control_plane.services.deployments`)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.db.models import Checkpoint, ServedModel
from control_plane.errors import InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.services import history
from control_plane.services.scoping import org_list_filter
from control_plane.statuses import Status

RESOURCE = "served_model"


async def create_served_model(
    s: AsyncSession,
    principal: Principal,
    checkpoint: Checkpoint,
    *,
    name: str | None = None,
    scale_down_delay_seconds: int = 3600,
) -> ServedModel:
    if checkpoint.kind != "sampler_weights":
        raise InvalidInput("only sampler_weights checkpoints can be served", field="checkpoint_id")
    now = datetime.now(UTC)
    sm = ServedModel(
        id=new_id("sm"),
        org_id=principal.org_id,
        created_by=principal.principal_id,
        base_model=checkpoint.base_model,
        name=name or checkpoint.name,
        status=Status.DEPLOYING.value,
        checkpoint_id=checkpoint.id,
        scale_down_delay_seconds=scale_down_delay_seconds,
        created_at=now,
        updated_at=now,
    )
    s.add(sm)
    history.initial(s, RESOURCE, sm, f"serving checkpoint {checkpoint.id}")
    await s.flush()
    return sm


async def get_served_model(s: AsyncSession, principal: Principal, served_model_id: str) -> ServedModel:
    sm = await s.get(ServedModel, served_model_id)
    if sm is None or sm.org_id != principal.org_id:
        raise NotFound("served model", served_model_id)
    return sm


async def list_served_models(s: AsyncSession, principal: Principal, *, scope: str | None = None) -> list[ServedModel]:
    q = (
        select(ServedModel)
        .where(*org_list_filter(ServedModel, principal, scope))
        .order_by(ServedModel.created_at.desc(), ServedModel.id.desc())
    )
    return list((await s.execute(q)).scalars())


async def deactivate_served_model(s: AsyncSession, principal: Principal, served_model_id: str) -> ServedModel:
    sm = await get_served_model(s, principal, served_model_id)
    if history.request_deactivation(s, RESOURCE, sm, "deactivation requested"):
        await s.flush()
    return sm
