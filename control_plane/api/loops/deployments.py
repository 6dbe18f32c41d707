"""/v1/loops/deployments: the trainers runs execute on (list, get, deactivate, metrics, logs)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from litestar import Controller, Request, get, post
from litestar.di import Provide
from litestar.params import Parameter

from control_plane.api.auth import provide_principal
from control_plane.api.fields import query_int
from control_plane.api.loops import presenters as p
from control_plane.api.loops.responses import (
    Deactivated,
    DeploymentEnvelope,
    DeploymentList,
    DeploymentLogs,
    DeploymentMetrics,
    LogLine,
)
from control_plane.api.loops.schemas import LOG_LEVELS, MAX_EPOCH_MILLIS, LogsQuery, MetricsBody
from control_plane.api.loops.training import ORG, DeploymentPath, ListScope
from control_plane.api.openapi import OptionalBodyOperation, raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput, NotFound, PayloadTooLarge
from control_plane.metering import series
from control_plane.scheduler.protocol import LogQuery, WorkloadRole
from control_plane.services import deployments as dep_svc

NS = 1_000_000

EpochMillisQuery = Annotated[int | None, query_int(ge=0, le=MAX_EPOCH_MILLIS)]
# a level in any letter case
_LEVEL_PATTERN = "^(?:" + "|".join("".join(f"[{c.upper()}{c.lower()}]" for c in x) for x in LOG_LEVELS) + ")$"


class LoopsDeploymentsController(Controller):
    path = "/v1/loops/deployments"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @get("", opt=ORG, responses=raises(InvalidInput))
    async def list_deployments(
        self, request: Request, principal: Principal, visibility: ListScope = None
    ) -> DeploymentList:
        r = rt(request)
        async with r.db.session() as s:
            rows = await dep_svc.list_deployments(s, principal, scope=visibility)
            users = await p.principal_names(s, {x.created_by for x in rows})
        return DeploymentList([p.deployment_json(x, r.settings.base_url, users) for x in rows])

    @get("/{deployment_id:str}", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def get_deployment(
        self, request: Request, principal: Principal, deployment_id: DeploymentPath
    ) -> DeploymentEnvelope:
        r = rt(request)
        async with r.db.session() as s:
            dep = await dep_svc.get_deployment(s, principal, deployment_id)
            users = await p.principal_names(s, {dep.created_by})
        return DeploymentEnvelope(p.deployment_json(dep, r.settings.base_url, users))

    @post("/{deployment_id:str}/deactivate", opt=ORG, status_code=200, responses=raises(InvalidInput, NotFound))
    async def deactivate_deployment(
        self, request: Request, principal: Principal, deployment_id: DeploymentPath
    ) -> Deactivated:
        r = rt(request)
        async with r.db.transaction() as s:
            dep = await dep_svc.deactivate_deployment(s, principal, deployment_id)
            users = await p.principal_names(s, {dep.created_by})
        await r.kick_controller()
        return p.deactivated_json(dep.id, dep.base_model, users, dep.created_by)

    @post(
        "/{deployment_id:str}/metrics",
        opt=ORG,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound),
        operation_class=OptionalBodyOperation,
    )
    async def deployment_metrics(
        self, request: Request, principal: Principal, deployment_id: DeploymentPath, data: MetricsBody | None = None
    ) -> DeploymentMetrics:
        """The trainer's request, CPU, memory, disk and GPU series (``series`` explains them)."""
        window = (data or MetricsBody()).window()
        async with rt(request).db.session() as s:
            dep = await dep_svc.get_deployment(s, principal, deployment_id)
            metrics = await series.deployment_metrics(s, dep_svc.RESOURCE, dep.id, window)
        return DeploymentMetrics(deployment_id=dep.id, metrics=metrics)

    @get("/{deployment_id:str}/logs", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def deployment_logs(
        self,
        request: Request,
        principal: Principal,
        deployment_id: DeploymentPath,
        start_epoch_millis: EpochMillisQuery = None,
        end_epoch_millis: EpochMillisQuery = None,
        direction: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, query_int(ge=1, le=1000)] = 500,
        min_level: Annotated[str, Parameter(pattern=_LEVEL_PATTERN)] = "DEBUG",
    ) -> DeploymentLogs:
        """The log lines of the deployment's trainer workers (its log file locally, its pods'
        logs on Kubernetes), newest first unless ``direction=asc``."""
        q = LogsQuery.parse(
            start_epoch_millis, end_epoch_millis, direction, limit, min_level, now_ms=int(time.time() * 1000)
        )
        r = rt(request)
        async with r.db.session() as s:
            dep = await dep_svc.get_deployment(s, principal, deployment_id)
        lines = await r.workload_backend().logs(
            dep.id,
            WorkloadRole.TRAINER,
            LogQuery(
                start_ns=q.start_ms * NS,
                end_ns=q.end_ms * NS,
                limit=q.limit,
                direction=q.direction,
                min_level=q.min_level,
            ),
        )
        return DeploymentLogs(
            [
                LogLine(
                    timestamp=str(x.timestamp_ns),
                    message=x.message,
                    replica=x.replica,
                    request_id=x.request_id,
                    level=x.level,
                )
                for x in lines
            ]
        )
