"""The kinds of resources with a status, and what differs between them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Deployment, Run, Sampler, ServedModel
from control_plane.scheduler.protocol import WorkloadRole

KindName = Literal["run", "sampler", "deployment", "served_model"]
StatusRow = Run | Sampler | Deployment | ServedModel


@dataclass(frozen=True, slots=True)
class Kind:
    name: KindName  # also the ``resource_type`` of status history rows
    model: type[Run] | type[Sampler] | type[Deployment] | type[ServedModel]
    # the role of the workload a row owns; None for runs, which own none: a run executes on
    # its deployment's trainer workload
    role: WorkloadRole | None
    # Runs follow their deployment; a deployment's trainer snapshots its run when it stops and
    # a new one restores it (docs/durability.md), so trainers scale to zero too.
    scales_to_zero: bool

    @property
    def owned_role(self) -> WorkloadRole:
        """The role of the workload this kind of row owns (runs own none)."""
        if self.role is None:
            raise ValueError(f"{self.name} rows own no workload")
        return self.role

    async def get(self, s: AsyncSession, rid: str) -> StatusRow | None:
        """The row (None when gone)."""
        return cast("StatusRow | None", await s.get(self.model, rid))

    async def locked(self, s: AsyncSession, rid: str) -> StatusRow | None:
        """The row, locked ``FOR UPDATE`` until the transaction ends (None when gone)."""
        stmt = select(self.model).where(self.model.id == rid).with_for_update()
        return cast("StatusRow | None", (await s.execute(stmt)).scalar_one_or_none())


RUN = Kind("run", Run, None, scales_to_zero=False)
SAMPLER = Kind("sampler", Sampler, WorkloadRole.SAMPLER, scales_to_zero=True)
DEPLOYMENT = Kind("deployment", Deployment, WorkloadRole.TRAINER, scales_to_zero=True)
SERVED_MODEL = Kind("served_model", ServedModel, WorkloadRole.SERVED_MODEL, scales_to_zero=True)
KINDS: dict[str, Kind] = {k.name: k for k in (RUN, SAMPLER, DEPLOYMENT, SERVED_MODEL)}


def kind_of(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown resource kind {name!r}: expected one of {sorted(KINDS)}") from None
