"""Served models: LoRA checkpoints of one base model served as an OpenAI-compatible model by
a vLLM server of their own (``POST /v1/loops/checkpoints/deploy``). Not to be confused with
Loops deployments (:mod:`control_plane.services.deployments`), the trainer workloads runs
execute on.

Clients name a checkpoint by its name (or its id) in ``model``; the base model by its name.
Only ``sampler_weights`` checkpoints deploy (a ``weights`` checkpoint is training state), all
of one base model, with distinct names."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.catalog import ModelCatalog
from control_plane.db.models import Checkpoint, ServedModel, ServedModelCheckpoint
from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.services import history, keyset
from control_plane.services.scoping import org_list_filter
from control_plane.statuses import TERMINAL, Status
from data_plane.sampler.names import adapter_name_for_prefix

RESOURCE = "served_model"
# LoRA adapters one served model holds (vLLM's --max-loras of its server)
MAX_CHECKPOINTS = 16
MAX_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class Served:
    """A served model and its checkpoints, in deploy order."""

    model: ServedModel
    checkpoints: list[ServedModelCheckpoint]

    def adapter_for(self, requested: str | None) -> tuple[str, str]:
        """The vLLM model name for a client's ``model`` and the name to answer with: a
        checkpoint's name or id, or the base model (``model`` may be left out when the served
        model holds one checkpoint)."""
        if requested is None or requested == "":
            if len(self.checkpoints) == 1:
                c = self.checkpoints[0]
                return c.adapter_name, c.model_name
            raise InvalidInput(f"name the model: one of {self.model_names()}", field="model")
        if requested == self.model.base_model:
            return requested, requested
        for c in self.checkpoints:
            if requested in (c.model_name, c.checkpoint_id):
                return c.adapter_name, c.model_name
        raise NotFound("model", requested)

    def model_names(self) -> list[str]:
        """What clients may pass as ``model``: each checkpoint's name, then the base model
        (the name its vLLM server serves it by)."""
        return [c.model_name for c in self.checkpoints] + [self.model.base_model]


async def deploy(
    s: AsyncSession,
    principal: Principal,
    catalog: ModelCatalog,
    *,
    checkpoint_ids: list[str],
    model_name: str,
    instance_type_id: str | None = None,
    hf_secret_name: str | None = None,
    scale_down_delay_seconds: int = 3600,
) -> Served:
    """Create a served model for ``checkpoint_ids`` (DEPLOYING; the controller starts its vLLM
    server). Every check happens before anything is written."""
    if not checkpoint_ids:
        raise InvalidInput(
            "checkpoint_ids is empty: name at least one sampler_weights checkpoint", field="checkpoint_ids"
        )
    if len(checkpoint_ids) > MAX_CHECKPOINTS:
        raise InvalidInput(
            f"{len(checkpoint_ids)} checkpoints: a served model holds at most {MAX_CHECKPOINTS}",
            field="checkpoint_ids",
        )
    dupes = sorted({c for c in checkpoint_ids if checkpoint_ids.count(c) > 1})
    if dupes:
        raise InvalidInput(f"checkpoint_ids lists {', '.join(dupes)} more than once", field="checkpoint_ids")
    if not model_name.strip():
        raise InvalidInput("model_name is empty", field="model_name")
    rows = {
        c.id: c
        for c in (
            await s.execute(
                select(Checkpoint).where(Checkpoint.id.in_(checkpoint_ids), Checkpoint.org_id == principal.org_id)
            )
        ).scalars()
    }
    missing = [c for c in checkpoint_ids if c not in rows]
    if missing:
        raise NotFound("checkpoint", missing[0])
    ckpts = [rows[c] for c in checkpoint_ids]
    for c in ckpts:
        if c.kind != "sampler_weights":
            raise InvalidInput(
                f"checkpoint {c.id} ({c.name}) is a {c.kind} checkpoint (training state): only sampler_weights "
                "checkpoints deploy; save one with save_weights_for_sampler",
                field="checkpoint_ids",
            )
    bases = sorted({c.base_model for c in ckpts})
    if len(bases) > 1:
        raise InvalidInput(
            f"the checkpoints belong to different base models ({', '.join(bases)}): one served model serves one",
            field="checkpoint_ids",
        )
    base = catalog.get(bases[0], field="checkpoint_ids")
    names: dict[str, str] = {}
    for c in ckpts:
        if c.name in names:
            raise InvalidInput(
                f"checkpoints {names[c.name]} and {c.id} are both named {c.name!r}; clients choose a checkpoint "
                "by name, so deploy them as separate served models",
                field="checkpoint_ids",
            )
        if c.name == base.name:
            raise InvalidInput(f"checkpoint {c.id} is named like its base model {base.name!r}", field="checkpoint_ids")
        names[c.name] = c.id
    now = datetime.now(UTC)
    sm = ServedModel(
        id=new_id("sm"),
        org_id=principal.org_id,
        created_by=principal.principal_id,
        base_model=base.name,
        name=model_name,
        status=Status.DEPLOYING.value,
        scale_down_delay_seconds=scale_down_delay_seconds,
        instance_type_id=instance_type_id,
        hf_secret_name=hf_secret_name,
        verification="pending",
        created_at=now,
        updated_at=now,
    )
    s.add(sm)
    await s.flush()
    members = [
        ServedModelCheckpoint(
            served_model_id=sm.id,
            position=i,
            checkpoint_id=c.id,
            model_name=c.name,
            adapter_name=adapter_name_for_prefix(c.storage_prefix),
        )
        for i, c in enumerate(ckpts)
    ]
    s.add_all(members)
    history.initial(s, RESOURCE, sm, f"serving {len(ckpts)} checkpoint(s): {', '.join(checkpoint_ids)}")
    await s.flush()
    return Served(sm, members)


async def get_served_model(s: AsyncSession, principal: Principal, served_model_id: str) -> ServedModel:
    sm = await s.get(ServedModel, served_model_id)
    if sm is None or sm.org_id != principal.org_id:
        raise NotFound("served model", served_model_id)
    return sm


async def checkpoints_of(s: AsyncSession, served_model_ids: list[str]) -> dict[str, list[ServedModelCheckpoint]]:
    out: dict[str, list[ServedModelCheckpoint]] = {i: [] for i in served_model_ids}
    if not served_model_ids:
        return out
    q = (
        select(ServedModelCheckpoint)
        .where(ServedModelCheckpoint.served_model_id.in_(served_model_ids))
        .order_by(ServedModelCheckpoint.served_model_id, ServedModelCheckpoint.position)
    )
    for c in (await s.execute(q)).scalars():
        out[c.served_model_id].append(c)
    return out


async def get_served(s: AsyncSession, principal: Principal, served_model_id: str) -> Served:
    sm = await get_served_model(s, principal, served_model_id)
    return Served(sm, (await checkpoints_of(s, [sm.id]))[sm.id])


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Served]
    next_page_token: str | None


async def list_served_models(
    s: AsyncSession,
    principal: Principal,
    *,
    scope: str | None = None,
    limit: int = MAX_PAGE_SIZE,
    page_token: str | None = None,
    live_only: bool = False,
) -> Page:
    """Newest first, ``limit`` at a time; ``page_token`` is the previous page's
    ``next_page_token`` (the position after its last row)."""
    conds = list(org_list_filter(ServedModel, principal, scope))
    if live_only:
        conds.append(ServedModel.status.notin_([x.value for x in TERMINAL]))
    rows, token = await keyset.newest_first(s, ServedModel, conds, limit, page_token, "page_token")
    members = await checkpoints_of(s, [r.id for r in rows])
    return Page([Served(r, members[r.id]) for r in rows], token)


async def deactivate_served_model(s: AsyncSession, principal: Principal, served_model_id: str) -> ServedModel:
    sm = await get_served_model(s, principal, served_model_id)
    if history.request_deactivation(s, RESOURCE, sm, "deactivation requested"):
        sm.endpoint = None
        await s.flush()
    return sm


async def live_served_models_of_checkpoint(s: AsyncSession, checkpoint_id: str) -> list[str]:
    """The live served models serving ``checkpoint_id`` (it may not be deleted while any is)."""
    q = (
        select(ServedModel.id)
        .join(ServedModelCheckpoint, ServedModelCheckpoint.served_model_id == ServedModel.id)
        .where(
            ServedModelCheckpoint.checkpoint_id == checkpoint_id,
            ServedModel.status.notin_([x.value for x in TERMINAL]),
        )
    )
    return list((await s.execute(q)).scalars())


def refuse_delete_if_served(checkpoint_id: str, served: list[str]) -> None:
    if served:
        raise Conflict(
            f"checkpoint {checkpoint_id} is served by {', '.join(served)}; deactivate "
            f"{'it' if len(served) == 1 else 'them'} first"
        )
