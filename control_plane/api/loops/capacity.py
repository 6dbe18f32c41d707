"""``/v1/training/capacity``: the org's GPU ceilings and what its live workloads hold
(control_plane/services/capacity.py). Reading needs a training key; changing the org's own
ceiling needs ``manage_org_api_keys``, the org administration scope."""

from __future__ import annotations

from litestar import Controller, Request, get, patch
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.loops.responses import TrainingCapacity, TrainingCapacityPatched, TrainingGpuCapacity
from control_plane.api.loops.schemas import PatchCapacityBody
from control_plane.api.openapi import raises
from control_plane.api.request import CONTROL_BODY
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput, PayloadTooLarge
from control_plane.services import capacity
from control_plane.statuses import Scope

READ = {"scope": Scope.MANAGE_ORG_TRAINING_PROJECTS}
ADMIN = {"scope": Scope.MANAGE_ORG_API_KEYS, **CONTROL_BODY}


def _item(x: capacity.GpuCapacity) -> TrainingGpuCapacity:
    return TrainingGpuCapacity(
        gpu_type=x.gpu_type,
        baseline=x.baseline,
        limit=x.limit,
        usage_count=x.usage_count,
        dedicated_usage_count=x.dedicated_usage_count,
        spot_usage_count=x.spot_usage_count,
    )


class TrainingCapacityController(Controller):
    path = "/v1/training/capacity"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @get("", opt=READ, responses=raises())
    async def get_capacity(self, request: Request, principal: Principal) -> TrainingCapacity:
        """Per GPU type: the org's ceiling (``limit``, -1 for none) and the units its live
        trainers, samplers and served models hold (``cpu`` for models without GPUs)."""
        r = rt(request)
        async with r.db.session() as s:
            items = await capacity.read_capacity(s, capacity.CapacityPolicy.of(r.settings, r.catalog), principal.org_id)
        return TrainingCapacity([_item(x) for x in items])

    @patch("", opt=ADMIN, responses=raises(InvalidInput, PayloadTooLarge))
    async def patch_capacity(
        self, request: Request, principal: Principal, data: PatchCapacityBody
    ) -> TrainingCapacityPatched:
        """Set the org's own ceiling for one GPU type, at most the one its operators set."""
        if data.team_id is not None:
            raise InvalidInput("openloops has no teams: leave team_id out to set the org's ceiling", field="team_id")
        r = rt(request)
        async with r.db.transaction() as s:
            item = await capacity.set_org_limit(
                s, capacity.CapacityPolicy.of(r.settings, r.catalog), principal.org_id, data.gpu_type, data.max_gpus
            )
        return TrainingCapacityPatched(_item(item))
