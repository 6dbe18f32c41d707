"""``GET /v1/loops/usage``: an openloops extension, the org's usage over a window
(control_plane/metering/usage_report.py says what is counted and how)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, get
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.fields import query_text
from control_plane.api.loops.responses import UsageReport
from control_plane.api.loops.training import ORG
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput
from control_plane.metering.usage_report import UsagePolicy, UsageWindow, usage_report

When = Annotated[str | None, query_text(max_length=64, description="ISO 8601 date or date-time (UTC if no zone)")]


class LoopsUsageController(Controller):
    path = "/v1/loops/usage"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @get("", opt=ORG, responses=raises(InvalidInput))
    async def usage(
        self,
        request: Request,
        principal: Principal,
        start: When = None,
        end: When = None,
        group_by: Annotated[str | None, query_text(max_length=8, description="run (default) or day")] = None,
    ) -> UsageReport:
        """The org's usage in ``[start, end)`` (default: the last 30 days; at most 366):
        worker-seconds by GPU type from the workloads' observed lifetimes, tokens trained,
        sampling (requests, samples, tokens) and served-model requests and tokens — one item
        per run (and per base model's samplers, per served model) or per UTC day, and the
        totals."""
        window = UsageWindow.parse(start, end, group_by)
        r = rt(request)
        async with r.db.session() as s:
            report = await usage_report(s, UsagePolicy(r.catalog, r.settings.trainer_ranks), principal.org_id, window)
        return UsageReport(**report)
