"""Capacity: per-org ceilings on the GPUs of each type that live workloads hold.

A ceiling applies per (org, GPU type). Its value is the lower of

- the operator's: ``openloops admin capacity set`` (a ``capacity_limits`` row's
  ``operator_max_gpus``), else the installation default ``OPENLOOPS_CAPACITY_DEFAULT_MAX_GPUS``
  (the type's entry, else its ``"*"`` entry);
- the org's own: ``PATCH /v1/training/capacity`` by a key with ``manage_org_api_keys`` (the
  org administration scope), which can lower the org's ceiling or raise it back, never above
  the operator's.

A type with neither has no ceiling (``limit`` -1 in ``GET /v1/training/capacity``).

Every path that makes a workload hold capacity — creating a run (its deployment and paired
sampler), a sampler, a sampling session, a served model, and waking a scaled-to-zero one —
runs inside :func:`reserving`: the org's advisory lock (held until the transaction ends), the
usage before, the rows written, the usage after; a GPU type whose usage grew past its ceiling
raises :class:`~control_plane.errors.CapacityExceeded` (429, ``details.reason =
"loops_capacity"``, ``Retry-After``) and the transaction rolls back. Concurrent creates of one
org are serialized by the lock, so together they never pass the ceiling. Usage is counted by
:mod:`.capacity_usage`, units by :mod:`.capacity_units`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog import ModelCatalog
from control_plane.db.models import CapacityLimit
from control_plane.errors import CapacityExceeded, InvalidInput
from control_plane.services.capacity_units import ANY_GPU, CPU
from control_plane.services.capacity_usage import Usage, org_usage
from control_plane.settings import Settings

WILDCARD = "*"
NO_LIMIT = -1  # ``limit`` of a type without a ceiling
MAX_GPUS = 100_000
# advisory locks in two-key form (a space apart from the controller's one-key leader lock):
# this class, and the org id's hash
LOCK_CLASS = 0x4F4C4341


@dataclass(frozen=True)
class CapacityPolicy:
    """What capacity needs from configuration (built from the settings and the catalog)."""

    catalog: ModelCatalog
    trainer_ranks: int
    defaults: Mapping[str, int]
    retry_after_s: float

    @classmethod
    def of(cls, settings: Settings, catalog: ModelCatalog) -> CapacityPolicy:
        return cls(
            catalog,
            settings.trainer_ranks,
            dict(settings.capacity_default_max_gpus),
            float(settings.capacity_retry_after_seconds),
        )

    def default_for(self, gpu_type: str) -> int | None:
        return self.defaults.get(gpu_type, self.defaults.get(WILDCARD))

    def known_types(self) -> set[str]:
        """GPU types the catalog's models use (``cpu`` for models without GPUs)."""
        types: set[str] = set()
        for m in self.catalog.models:
            for res in (m.resources.trainer, m.resources.sampler):
                types.add((res.gpu_type or ANY_GPU) if res.gpus > 0 else CPU)
        return types


@dataclass(frozen=True)
class GpuCapacity:
    """One row of ``GET /v1/training/capacity``."""

    gpu_type: str
    limit: int  # NO_LIMIT when none
    operator_limit: int | None
    usage_count: int
    dedicated_usage_count: int
    spot_usage_count: int

    @property
    def baseline(self) -> int:
        # openloops has no queue: everything below the ceiling starts at once
        return max(self.limit, 0)


def _ceiling(policy: CapacityPolicy, row: CapacityLimit | None, gpu_type: str) -> tuple[int | None, int | None]:
    """(the ceiling that applies, the operator's) for ``gpu_type``."""
    operator = row.operator_max_gpus if row is not None and row.operator_max_gpus is not None else None
    if operator is None:
        operator = policy.default_for(gpu_type)
    own = row.org_max_gpus if row is not None else None
    applies = [x for x in (operator, own) if x is not None]
    return (min(applies) if applies else None), operator


async def _rows(s: AsyncSession, org_id: str) -> dict[str, CapacityLimit]:
    q = select(CapacityLimit).where(CapacityLimit.org_id == org_id).execution_options(populate_existing=True)
    rows = (await s.execute(q)).scalars()
    return {r.gpu_type: r for r in rows}


async def lock_org(s: AsyncSession, org_id: str) -> None:
    """The org's capacity lock, held until the transaction ends."""
    await s.execute(text("SELECT pg_advisory_xact_lock(:c, hashtext(:o))"), {"c": LOCK_CLASS, "o": org_id})


@asynccontextmanager
async def reserving(s: AsyncSession, policy: CapacityPolicy, org_id: str) -> AsyncIterator[None]:
    """Run the body (which writes the rows of a workload that will hold capacity) under the
    org's lock; raises CapacityExceeded when what it added takes a GPU type past its ceiling.
    Must be entered before the transaction locks any workload row (lock order: org first)."""
    await lock_org(s, org_id)
    before = (await org_usage(s, policy.catalog, policy.trainer_ranks, org_id)).total()
    yield
    await s.flush()
    after = (await org_usage(s, policy.catalog, policy.trainer_ranks, org_id)).total()
    grown = {t: n for t, n in after.items() if n > before[t]}
    if not grown:
        return
    rows = await _rows(s, org_id)
    for gpu_type, n in sorted(grown.items()):
        limit, _ = _ceiling(policy, rows.get(gpu_type), gpu_type)
        if limit is not None and n > limit:
            raise CapacityExceeded(
                f"capacity: this would hold {n} {gpu_type} units for the org, past its ceiling of {limit} "
                f"({before[gpu_type]} in use); deactivate a run, sampler or served model (or let one scale to "
                "zero) and retry, or ask an admin to raise the ceiling",
                policy.retry_after_s,
            )


def _item(policy: CapacityPolicy, rows: dict[str, CapacityLimit], usage: Usage, gpu_type: str) -> GpuCapacity:
    limit, operator = _ceiling(policy, rows.get(gpu_type), gpu_type)
    return GpuCapacity(
        gpu_type=gpu_type,
        limit=NO_LIMIT if limit is None else limit,
        operator_limit=operator,
        usage_count=usage.dedicated[gpu_type] + usage.spot[gpu_type],
        dedicated_usage_count=usage.dedicated[gpu_type],
        spot_usage_count=usage.spot[gpu_type],
    )


async def read_capacity(s: AsyncSession, policy: CapacityPolicy, org_id: str) -> list[GpuCapacity]:
    """Every GPU type the org has a ceiling for, uses, or the catalog uses; by type."""
    rows = await _rows(s, org_id)
    usage = await org_usage(s, policy.catalog, policy.trainer_ranks, org_id)
    named = {t for t in policy.defaults if t != WILDCARD}
    types = set(rows) | named | set(usage.total()) | policy.known_types()
    return [_item(policy, rows, usage, t) for t in sorted(types)]


def _check(gpu_type: str, max_gpus: int | None) -> None:
    if not gpu_type or len(gpu_type) > 100 or "\x00" in gpu_type or gpu_type == WILDCARD:
        raise InvalidInput("gpu_type must be 1-100 characters (not '*')", field="gpu_type")
    if max_gpus is not None and not 0 <= max_gpus <= MAX_GPUS:
        raise InvalidInput(f"max_gpus must be between 0 and {MAX_GPUS}", field="max_gpus")


async def _upsert(s: AsyncSession, org_id: str, gpu_type: str, **values: int | None) -> None:
    now = datetime.now(UTC)
    stmt = insert(CapacityLimit).values(org_id=org_id, gpu_type=gpu_type, updated_at=now, **values)
    await s.execute(
        stmt.on_conflict_do_update(index_elements=["org_id", "gpu_type"], set_={**values, "updated_at": now})
    )


async def set_org_limit(
    s: AsyncSession, policy: CapacityPolicy, org_id: str, gpu_type: str, max_gpus: int
) -> GpuCapacity:
    """An org admin's own ceiling for ``gpu_type`` (at most the operator's)."""
    _check(gpu_type, max_gpus)
    known = policy.known_types() | {t for t in policy.defaults if t != WILDCARD}
    rows = await _rows(s, org_id)
    if gpu_type not in known and gpu_type not in rows:
        raise InvalidInput(
            f"unknown gpu_type {gpu_type!r}; this server's types: {', '.join(sorted(known)) or '(none)'}",
            field="gpu_type",
        )
    _, operator = _ceiling(policy, rows.get(gpu_type), gpu_type)
    if operator is not None and max_gpus > operator:
        raise InvalidInput(
            f"max_gpus {max_gpus} is above the ceiling of {operator} {gpu_type} this org has on this server "
            "(set by its operators)",
            field="max_gpus",
        )
    await _upsert(s, org_id, gpu_type, org_max_gpus=max_gpus)
    return await get_capacity(s, policy, org_id, gpu_type)


async def set_operator_limit(
    s: AsyncSession, policy: CapacityPolicy, org_id: str, gpu_type: str, max_gpus: int | None
) -> GpuCapacity:
    """An operator's ceiling for the org (``None``: back to the installation default)."""
    _check(gpu_type, max_gpus)
    await _upsert(s, org_id, gpu_type, operator_max_gpus=max_gpus)
    return await get_capacity(s, policy, org_id, gpu_type)


async def get_capacity(s: AsyncSession, policy: CapacityPolicy, org_id: str, gpu_type: str) -> GpuCapacity:
    rows = await _rows(s, org_id)
    usage = await org_usage(s, policy.catalog, policy.trainer_ranks, org_id)
    return _item(policy, rows, usage, gpu_type)
