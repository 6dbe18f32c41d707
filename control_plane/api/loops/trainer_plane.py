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
from typing import Any

from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.errors import http_status_of
from control_plane.api.loops.gateway_errors import DATA_PLANE_EXCEPTION_HANDLERS
from control_plane.api.loops.training import ORG
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.errors import RunOrSamplerRequired
from control_plane.training.loops_ops import LoopsTrainerOps
from control_plane.training.loops_wire import OPS

SCHEMA_VERSION = 1
RESOURCE = "deployment"


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


def _json(status: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers or {})


class LoopsTrainerPlaneController(Controller):
    path = "/v1/loops/deployments/{deployment_id:str}/trainer"
    dependencies = {"principal": Provide(provide_principal)}
    exception_handlers = DATA_PLANE_EXCEPTION_HANDLERS  # type: ignore[assignment]
    tags = ["loops data plane"]

    @get("/health", opt=ORG)
    async def health(
        self, request: Request, principal: Principal, deployment_id: str, base_model: str | None = None
    ) -> Response[Any]:
        with metered(request, deployment_id) as out:
            ops = LoopsTrainerOps(rt(request))
            t = await ops.target(principal, deployment_id, run_header(request))
            ready, why = await ops.health(t, base_model)
            out.status = 200 if ready else 503
            body = {"status": "ok" if ready else "starting", "run_id": t.run.id, "base_model": t.deployment.base_model}
            if not ready:
                body["detail"] = why
            return _json(out.status, body)

    @get("/policy_version", opt=ORG)
    async def policy_version(self, request: Request, principal: Principal, deployment_id: str) -> dict[str, Any]:
        with metered(request, deployment_id):
            ops = LoopsTrainerOps(rt(request))
            t = await ops.target(principal, deployment_id, run_header(request))
            return {"policy_version": await ops.policy_version(t), "run_id": t.run.id}

    @get("/operations/{operation_id:str}", opt=ORG)
    async def operation(
        self, request: Request, principal: Principal, deployment_id: str, operation_id: str
    ) -> Response[Any]:
        with metered(request, deployment_id) as out:
            ops = LoopsTrainerOps(rt(request))
            t = await ops.target(principal, deployment_id, run_header(request))
            answer = await ops.poll(principal, t, operation_id)
            out.status = answer.status_code
            out.skip = answer.status_code == 408  # the protocol's "still working", not an outcome
            return _json(answer.status_code, answer.body)

    @post([f"/{op}" for op in OPS], opt=ORG, status_code=202)
    async def submit(self, request: Request, principal: Principal, deployment_id: str) -> Response[Any]:
        with metered(request, deployment_id) as out:
            op = request.url.path.rstrip("/").rsplit("/", 1)[-1]
            ops = LoopsTrainerOps(rt(request))
            t = await ops.target(principal, deployment_id, run_header(request))
            operation_id = await ops.submit(
                principal, t, op, await request.body(), request.headers.get("idempotency-key")
            )
            out.status = 202
            location = f"{request.url.path.rsplit('/', 1)[0]}/operations/{operation_id}"
            return _json(202, {"operation_id": operation_id, "schema_version": SCHEMA_VERSION}, {"Location": location})
