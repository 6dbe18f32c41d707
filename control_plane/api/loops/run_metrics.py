"""A run's telemetry, openloops extensions of the Loops API:
``GET /v1/loops/runs/{run_id}/training_metrics``, the metrics its trainer reported per optimizer
step (control_plane/telemetry/), and ``GET /v1/loops/runs/{run_id}/sampling_metrics``, the
requests, samples, tokens and latency of the sampling its samplers did, per minute
(control_plane/metering/)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, get
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.fields import query_int, query_text
from control_plane.api.loops.responses import MetricsStep, SamplingMetrics, TrainingMetrics
from control_plane.api.loops.schemas import MAX_EPOCH_MILLIS, MetricsBody
from control_plane.api.loops.training import ORG, RunPath
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput, NotFound
from control_plane.metering import series
from control_plane.metering.requests import RUN_SAMPLING
from control_plane.services import runs as runs_svc
from control_plane.telemetry import reads

StepQuery = Annotated[int | None, query_int(ge=0, le=reads.MAX_STEP)]
MillisQuery = Annotated[int | None, query_int(ge=0, le=MAX_EPOCH_MILLIS)]


class LoopsRunMetricsController(Controller):
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

    @get("/runs/{run_id:str}/sampling_metrics", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def sampling_metrics(
        self,
        request: Request,
        principal: Principal,
        run_id: RunPath,
        start_epoch_millis: MillisQuery = None,
        end_epoch_millis: MillisQuery = None,
        step_seconds: Annotated[int | None, query_int(ge=60, le=series.MAX_STEP_SECONDS)] = None,
        time_divisor_seconds: Annotated[int | None, query_int(ge=1, le=series.MAX_STEP_SECONDS)] = None,
    ) -> SamplingMetrics:
        """The sampling the run's samplers did (both APIs; a sampler pinned to one of its
        checkpoints counts for it) over ``[start, end)`` (default: the last hour) in steps of
        ``step_seconds`` (a multiple of 60): request volume by outcome, latency percentiles,
        concurrency, and samples / prompt tokens / generated tokens — per step, or per
        ``time_divisor_seconds`` — plus the window's totals."""
        window = MetricsBody(
            start_epoch_millis=start_epoch_millis,
            end_epoch_millis=end_epoch_millis,
            step_seconds=step_seconds,
            time_divisor_seconds=time_divisor_seconds,
        ).window()
        async with rt(request).db.session() as s:
            run = await runs_svc.get_run(s, principal, run_id)
            metrics = await series.request_series(s, RUN_SAMPLING, run.id, window, tokens=True)
            totals = await series.sampling_totals(s, RUN_SAMPLING, run.id, window)
        return SamplingMetrics(
            run_id=run.id,
            start=window.start,
            end=window.end,
            step_seconds=window.step,
            metrics=metrics,
            totals=totals,
        )
