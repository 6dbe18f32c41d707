"""``openloops admin capacity show|set``: an org's GPU ceilings and usage, for operators
(control_plane/services/capacity.py). ``set`` writes the operator's ceiling for the org, which
overrides the installation default (``OPENLOOPS_CAPACITY_DEFAULT_MAX_GPUS``) and bounds what the
org's admins may set through ``PATCH /v1/training/capacity``."""

from __future__ import annotations

from typing import Any

from control_plane.catalog import ModelCatalog
from control_plane.db.engine import Database
from control_plane.services import capacity, identity
from control_plane.settings import Settings

COLUMNS = ["gpu_type", "limit", "operator_limit", "usage_count", "dedicated_usage_count", "spot_usage_count"]


def _policy(settings: Settings) -> capacity.CapacityPolicy:
    return capacity.CapacityPolicy.of(settings, ModelCatalog.load(settings.resolved_catalog_path))


def _row(x: capacity.GpuCapacity) -> dict[str, Any]:
    return {
        "gpu_type": x.gpu_type,
        "limit": x.limit,
        "operator_limit": x.operator_limit,
        "usage_count": x.usage_count,
        "dedicated_usage_count": x.dedicated_usage_count,
        "spot_usage_count": x.spot_usage_count,
    }


async def show(d: Database, settings: Settings, org: str) -> list[dict[str, Any]]:
    async with d.session() as s:
        org_id = (await identity.get_org(s, org)).id
        return [_row(x) for x in await capacity.read_capacity(s, _policy(settings), org_id)]


async def set_limit(d: Database, settings: Settings, org: str, gpu_type: str, max_gpus: int | None) -> dict[str, Any]:
    async with d.transaction() as s:
        org_id = (await identity.get_org(s, org)).id
        return _row(await capacity.set_operator_limit(s, _policy(settings), org_id, gpu_type, max_gpus))
