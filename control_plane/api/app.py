"""Builds the Litestar application from a Runtime (one per API process)."""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from control_plane.api.errors import EXCEPTION_HANDLERS
from control_plane.api.health import download, healthz, metrics, readyz
from control_plane.api.legacy import LegacyController
from control_plane.api.loops.deployments import LoopsDeploymentsController
from control_plane.api.loops.resources import LoopsResourcesController
from control_plane.api.loops.sampler_plane import LoopsSamplerPlaneController, SamplerStatusController
from control_plane.api.loops.trainer_plane import LoopsTrainerPlaneController
from control_plane.api.loops.training import LoopsTrainingController
from control_plane.api.observability import HttpMetrics, observability_middleware
from control_plane.api.tinker.routes import TINKER_HANDLERS
from control_plane.runtime import Runtime


def create_app(runtime: Runtime, *, extra_handlers: list | None = None) -> Litestar:
    http_metrics = HttpMetrics()
    handlers = [
        healthz,
        readyz,
        metrics,
        download,
        LoopsTrainingController,
        LoopsResourcesController,
        LoopsDeploymentsController,
        LoopsTrainerPlaneController,
        LoopsSamplerPlaneController,
        SamplerStatusController,
        LegacyController,
        *TINKER_HANDLERS,
        *runtime.extras.get("route_handlers", []),
        *(extra_handlers or []),
    ]
    return Litestar(
        route_handlers=handlers,
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        middleware=[observability_middleware(http_metrics, runtime.settings.access_log)],
        request_max_body_size=runtime.settings.request_body_limit_bytes,
        state=State({"runtime": runtime, "http_metrics": http_metrics}),
        openapi_config=OpenAPIConfig(
            title="openloops",
            version="0.1.0",
            description="Baseten Loops management API and Tinker training API",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        logging_config=None,
        debug=False,
    )
