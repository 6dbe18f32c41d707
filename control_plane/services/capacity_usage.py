"""What an org's live workloads hold now, per GPU type (the ``usage_count`` of capacity).

Counted from the rows, which are the desired state: a deployment, sampler or served model
holds capacity from its creation (DEPLOYING) until it scales to zero, is being deactivated or
ends (statuses in :data:`control_plane.statuses.LIVE`; a waking one counts). An org's live
samplers of one base model count one sampler workload: they share one vLLM server.
Deployments split into dedicated and spot by their ``availability_model``; samplers and served
models are dedicated. Models no longer in the catalog count nothing (they cannot start)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog import ModelCatalog
from control_plane.db.models import Deployment, Sampler, ServedModel
from control_plane.services.capacity_units import sampler_units, trainer_units
from control_plane.statuses import LIVE

_LIVE = [x.value for x in LIVE]


@dataclass
class Usage:
    dedicated: Counter[str] = field(default_factory=Counter)
    spot: Counter[str] = field(default_factory=Counter)

    def total(self) -> Counter[str]:
        return self.dedicated + self.spot


async def org_usage(s: AsyncSession, catalog: ModelCatalog, trainer_ranks: int, org_id: str) -> Usage:
    usage = Usage()
    deps = await s.execute(
        select(Deployment.base_model, Deployment.replicas, Deployment.availability_model).where(
            Deployment.org_id == org_id, Deployment.status.in_(_LIVE)
        )
    )
    for base_model, replicas, availability in deps:
        if (model := catalog.find(base_model)) is not None:
            target = usage.spot if availability == "spot" else usage.dedicated
            target.update(trainer_units(model, replicas, trainer_ranks))
    sampled = await s.execute(
        select(Sampler.base_model).where(Sampler.org_id == org_id, Sampler.status.in_(_LIVE)).distinct()
    )
    served = await s.execute(
        select(ServedModel.base_model).where(ServedModel.org_id == org_id, ServedModel.status.in_(_LIVE))
    )
    for base_model in [*sampled.scalars(), *served.scalars()]:
        if (model := catalog.find(base_model)) is not None:
            usage.dedicated.update(sampler_units(model))
    return usage
