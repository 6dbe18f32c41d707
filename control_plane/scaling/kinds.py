"""The three kinds of resources that own a workload, and what differs between them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from control_plane.db.models import Deployment, Run, Sampler
from control_plane.scheduler.protocol import WorkloadRole

KindName = Literal["run", "sampler", "deployment"]


@dataclass(frozen=True, slots=True)
class Kind:
    name: KindName  # also the ``resource_type`` of status history rows
    model: type[Run] | type[Sampler] | type[Deployment]
    role: WorkloadRole
    # Runs do not scale to zero: a trainer holds LoRA weights and optimizer state in memory
    # that a restarted worker cannot recover (see docs/kubernetes.md, "Scale to zero").
    scales_to_zero: bool


RUN = Kind("run", Run, WorkloadRole.TRAINER, scales_to_zero=False)
SAMPLER = Kind("sampler", Sampler, WorkloadRole.SAMPLER, scales_to_zero=True)
DEPLOYMENT = Kind("deployment", Deployment, WorkloadRole.DEPLOYMENT, scales_to_zero=True)
KINDS: dict[str, Kind] = {k.name: k for k in (RUN, SAMPLER, DEPLOYMENT)}


def kind_of(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown resource kind {name!r}: expected one of {sorted(KINDS)}") from None
