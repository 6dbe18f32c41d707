"""``GET /v1/loops/runs/{run_id}/training_metrics``: an openloops extension, the metrics the
run's trainer reported per optimizer step (control_plane/telemetry/)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, get
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.fields import query_int, query_text
from control_plane.api.loops.responses import MetricsStep, TrainingMetrics
from control_plane.api.loops.training import ORG, RunPath
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput, NotFound
from control_plane.services import runs as runs_svc
from control_plane.telemetry import reads

StepQuery = Annotated[int | None, query_int(ge=0, le=reads.MAX_STEP)]


class LoopsTrainingMetricsController(Controller):
    path = "/v1/loops"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @get("/runs/{run_id:str}/training_metrics", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def training_metrics(
        self,
        request: Request,
        principal: Principal,
        run_id: RunPath,
        start_step: StepQuery = None,
        end_step: StepQuery = None,
        limit: Annotated[int, query_int(ge=1, le=reads.MAX_LIMIT)] = reads.DEFAULT_LIMIT,
        cursor: Annotated[str | None, query_text(max_length=64)] = None,
        max_points: Annotated[int | None, query_int(ge=1, le=reads.MAX_POINTS)] = None,
    ) -> TrainingMetrics:
        """Steps ``start_step``..``end_step`` (inclusive) in order, ``limit`` per page
        (``next_cursor`` continues); with ``max_points`` and more steps than that, the range in
        ``max_points`` averaged buckets of consecutive steps (``downsampled``)."""
        async with rt(request).db.session() as s:
            run = await runs_svc.get_run(s, principal, run_id)
            page = await reads.training_metrics(
                s,
                run.id,
                start_step=start_step,
                end_step=end_step,
                limit=limit,
                cursor=cursor,
                max_points=max_points,
            )
        return TrainingMetrics(
            steps=[MetricsStep(p.step, p.time, p.metrics) for p in page.steps],
            next_cursor=page.next_cursor,
            downsampled=page.downsampled,
        )
