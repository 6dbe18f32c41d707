"""/v1/loops/deployments: the trainers runs execute on (list, get, deactivate, metrics, logs)."""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import Provide
from litestar.params import Parameter

from control_plane.api.auth import provide_principal
from control_plane.api.loops import presenters as p
from control_plane.api.loops.schemas import LogsQuery, MetricsBody
from control_plane.api.loops.training import ORG
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.metering import series
from control_plane.scheduler.protocol import LogQuery, WorkloadRole
from control_plane.services import deployments as dep_svc

NS = 1_000_000


class LoopsDeploymentsController(Controller):
    path = "/v1/loops/deployments"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @get("", opt=ORG)
    async def list_deployments(
        self, request: Request, principal: Principal, visibility: str | None = Parameter(query="scope", default=None)
    ) -> dict[str, Any]:
        r = rt(request)
        async with r.db.session() as s:
            rows = await dep_svc.list_deployments(s, principal, scope=visibility)
            users = await p.principal_names(s, {x.created_by for x in rows})
        return {"deployments": [p.deployment_json(x, r.settings.base_url, users) for x in rows]}

    @get("/{deployment_id:str}", opt=ORG)
    async def get_deployment(self, request: Request, principal: Principal, deployment_id: str) -> dict[str, Any]:
        r = rt(request)
        async with r.db.session() as s:
            dep = await dep_svc.get_deployment(s, principal, deployment_id)
            users = await p.principal_names(s, {dep.created_by})
        return {"deployment": p.deployment_json(dep, r.settings.base_url, users)}

    @post("/{deployment_id:str}/deactivate", opt=ORG, status_code=200)
    async def deactivate_deployment(self, request: Request, principal: Principal, deployment_id: str) -> dict[str, Any]:
        r = rt(request)
        async with r.db.transaction() as s:
            dep = await dep_svc.deactivate_deployment(s, principal, deployment_id)
            users = await p.principal_names(s, {dep.created_by})
        await r.kick_controller()
        return p.deactivated_json(dep.id, dep.base_model, users, dep.created_by)

    @post("/{deployment_id:str}/metrics", opt=ORG, status_code=200)
    async def deployment_metrics(
        self, request: Request, principal: Principal, deployment_id: str, data: MetricsBody | None = None
    ) -> dict[str, Any]:
        """The trainer's request, CPU, memory, disk and GPU series (``series`` explains them)."""
        body = data or MetricsBody()
        window = series.Window.parse(
            body.start_epoch_millis, body.end_epoch_millis, body.step_seconds, body.time_divisor_seconds
        )
        async with rt(request).db.session() as s:
            dep = await dep_svc.get_deployment(s, principal, deployment_id)
            metrics = await series.deployment_metrics(s, dep_svc.RESOURCE, dep.id, window)
        return {"deployment_id": dep.id, "metrics": metrics}

    @get("/{deployment_id:str}/logs", opt=ORG)
    async def deployment_logs(
        self,
        request: Request,
        principal: Principal,
        deployment_id: str,
        start_epoch_millis: int | None = None,
        end_epoch_millis: int | None = None,
        direction: str = "desc",
        limit: int = 500,
        min_level: str = "DEBUG",
    ) -> dict[str, Any]:
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
        return {
            "logs": [
                {
                    "timestamp": str(x.timestamp_ns),
                    "message": x.message,
                    "replica": x.replica,
                    "request_id": x.request_id,
                    "level": x.level,
                }
                for x in lines
            ]
        }
