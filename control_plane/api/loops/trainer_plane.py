"""The Loops trainer data plane at a run's ``base_url``
(``/v1/loops/deployments/{deployment_id}/trainer``), as the Loops SDK speaks it:

- ``GET /health?base_model=``: 200 once the deployment's trainer executes the run named by
  ``X-Run-Id`` (503 until then; 404/410 for a wrong model or an ended run);
- ``POST /{op}`` (``init_trainer_server``, ``forward``, ``forward_backward``, ``optim_step``,
  ``save_state``, ``save_weights_for_sampler``, ``load_state``, ``load_state_with_optimizer``)
  with an ``Idempotency-Key``: ``202 {operation_id, schema_version: 1}`` + ``Location``;
- ``GET /operations/{id}``: long-polled; ``408`` while pending, then
  ``{status: done, result}`` or ``{status: error, error, error_class}``;
- ``GET /policy_version``: the optimizer steps the run's adapter has taken.

Thin handlers over :class:`~control_plane.training.loops_ops.LoopsTrainerOps`; every request
is counted in the deployment's request metrics (a poll that only timed out is not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from control_plane.api.auth import provide_principal
from control_plane.api.errors import http_status_of
from control_plane.api.loops.gateway_errors import DATA_PLANE_EXCEPTION_HANDLERS
from control_plane.api.loops.responses import (
    OperationAccepted,
    OperationDone,
    OperationFailed,
    OperationPending,
    PolicyVersion,
    TrainerHealth,
)
from control_plane.api.loops.training import ORG, DeploymentPath
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import Conflict, Gone, InvalidInput, NotFound, PayloadTooLarge, RunOrSamplerRequired
from control_plane.fields import NO_NUL, column_length
from control_plane.training import loops_wire as w
from control_plane.training.loops_ops import IDEMPOTENCY_KEY_RE, LoopsTrainerOps

SCHEMA_VERSION = 1
RESOURCE = "deployment"

RunHeader = Annotated[
    str,
    Parameter(
        header="X-Run-Id",
        min_length=1,
        max_length=column_length(m.Run.id),
        pattern=NO_NUL,
        description="the run this request is for (the deployment must execute it)",
    ),
]
IdempotencyKey = Annotated[
    str,
    Parameter(
        header="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_RE.pattern,
        description="the operation's id: a retry with the same key and body is the same operation",
    ),
]


def run_header(request: Request) -> str:
    """The run a trainer request names: ``X-Run-Id`` and no ``X-Sampler-Id``."""
    run_id = request.headers.get("x-run-id")
    if not run_id or request.headers.get("x-sampler-id"):
        raise RunOrSamplerRequired(
            "name exactly one of X-Run-Id or X-Sampler-Id (a trainer request names its run)", field="X-Run-Id"
        )
    return run_id


@contextlib.contextmanager
def metered(request: Request, deployment_id: str) -> Iterator[Any]:
    """Count the request in the deployment's metrics, with the status it is answered with."""
    with rt(request).meter.track(RESOURCE, deployment_id) as out:
        try:
            yield out
        except Exception as exc:
            out.status = http_status_of(exc)
            raise


def _json(status: int, body: bytes | Any, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers or {})


def _submit_handler(op: str, body_type: type[w._Op]) -> HTTPRouteHandler:
    """``POST /{op}``: its own operation in the OpenAPI, with its body type."""

    async def submit(
        self: LoopsTrainerPlaneController,
        request: Request,
        principal: Principal,
        deployment_id: DeploymentPath,
        x_run_id: RunHeader,
        idempotency_key: IdempotencyKey,
        data: Any,
    ) -> Response[Any]:
        with metered(request, deployment_id) as out:
            ops = LoopsTrainerOps(rt(request))
            t = await ops.target(principal, deployment_id, run_header(request))
            raw = await request.body()
            operation_id = await ops.submit(principal, t, op, raw, idempotency_key, data)
            out.status = 202
            location = f"{request.url.path.rsplit('/', 1)[0]}/operations/{operation_id}"
            return _json(202, OperationAccepted(operation_id, SCHEMA_VERSION), {"Location": location})

    submit.__annotations__ = {**submit.__annotations__, "data": body_type}
    submit.__name__ = submit.__qualname__ = f"submit_{op}"
    return post(
        f"/{op}",
        opt=ORG,
        status_code=202,
        name=f"loops_trainer_{op}",
        summary=f"Submit {op}",
        responses=raises(
            InvalidInput,
            RunOrSamplerRequired,
            PayloadTooLarge,
            NotFound,
            Conflict,
            Gone,
            ok=OperationAccepted,
            ok_status=202,
        ),
    )(submit)


class LoopsTrainerPlaneController(Controller):
    path = "/v1/loops/deployments/{deployment_id:str}/trainer"
    dependencies = {"principal": Provide(provide_principal)}
    exception_handlers = DATA_PLANE_EXCEPTION_HANDLERS  # type: ignore[assignment]
    tags = ["loops data plane"]

    @get(
        "/health",
        opt=ORG,
        responses={
            **raises(InvalidInput, RunOrSamplerRequired, NotFound, Gone, ok=TrainerHealth),
            503: ResponseSpec(
                TrainerHealth, description="the trainer does not execute the run yet", generate_examples=False
            ),
        },
    )
    async def health(
        self,
        request: Request,
        principal: Principal,
        deployment_id: DeploymentPath,
        x_run_id: RunHeader,
        base_model: Annotated[str | None, Parameter(max_length=column_length(m.Run.base_model), pattern=NO_NUL)] = None,
    ) -> Response[Any]:
        with metered(request, deployment_id) as out:
            ops = LoopsTrainerOps(rt(request))
            t = await ops.target(principal, deployment_id, run_header(request))
            ready, why = await ops.health(t, base_model)
            out.status = 200 if ready else 503
            body = TrainerHealth(
                status="ok" if ready else "starting", run_id=t.run.id, base_model=t.deployment.base_model
            )
            if not ready:
                body.detail = why
            return _json(out.status, body)

    @get("/policy_version", opt=ORG, responses=raises(InvalidInput, RunOrSamplerRequired, NotFound))
    async def policy_version(
        self, request: Request, principal: Principal, deployment_id: DeploymentPath, x_run_id: RunHeader
    ) -> PolicyVersion:
        with metered(request, deployment_id):
            ops = LoopsTrainerOps(rt(request))
            t = await ops.target(principal, deployment_id, run_header(request))
            return PolicyVersion(policy_version=await ops.policy_version(t), run_id=t.run.id)

    @get(
        "/operations/{operation_id:str}",
        opt=ORG,
        responses={
            **raises(InvalidInput, RunOrSamplerRequired, NotFound, ok=OperationDone | OperationFailed),
            408: ResponseSpec(
                OperationPending, description="still running: poll again (a long poll)", generate_examples=False
            ),
        },
    )
    async def operation(
        self,
        request: Request,
        principal: Principal,
        deployment_id: DeploymentPath,
        x_run_id: RunHeader,
        operation_id: Annotated[str, Parameter(pattern=IDEMPOTENCY_KEY_RE.pattern)],
    ) -> Response[Any]:
        with metered(request, deployment_id) as out:
            ops = LoopsTrainerOps(rt(request))
            t = await ops.target(principal, deployment_id, run_header(request))
            answer = await ops.poll(principal, t, operation_id)
            out.status = answer.status_code
            out.skip = answer.status_code == 408  # the protocol's "still working", not an outcome
            return _json(answer.status_code, answer.body)


for _op, _body in w.OPS.items():
    setattr(LoopsTrainerPlaneController, f"submit_{_op}", _submit_handler(_op, _body))
