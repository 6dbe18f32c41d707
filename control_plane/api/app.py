"""Builds the Litestar application from a Runtime (one per API process)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.routes import HTTPRoute

from control_plane.api.console.routes import console_router
from control_plane.api.errors import EXCEPTION_HANDLERS
from control_plane.api.health import download, healthz, metrics, readyz
from control_plane.api.legacy import LegacyController
from control_plane.api.loops.capacity import TrainingCapacityController
from control_plane.api.loops.checkpoint_import import LoopsCheckpointImportController
from control_plane.api.loops.deployments import LoopsDeploymentsController
from control_plane.api.loops.resources import LoopsResourcesController
from control_plane.api.loops.run_metrics import LoopsRunMetricsController
from control_plane.api.loops.sampler_plane import LoopsSamplerPlaneController, SamplerStatusController
from control_plane.api.loops.served_models import ServedModelOpenAIController, ServedModelsController
from control_plane.api.loops.trainer_plane import LoopsTrainerPlaneController
from control_plane.api.loops.training import LoopsTrainingController
from control_plane.api.loops.usage import LoopsUsageController
from control_plane.api.observability import HttpMetrics, observability_middleware
from control_plane.api.openapi import ExactJsonRenderPlugin
from control_plane.api.openloops.routes import OpenloopsController
from control_plane.api.request import ApiRequest
from control_plane.api.tinker.routes import TINKER_HANDLERS
from control_plane.runtime import Runtime


def _options_answer(allow: dict[str, str]) -> Callable[[Request[Any, Any, Any]], Awaitable[Response[None] | None]]:
    """``OPTIONS``: the methods of the path. Litestar's own answer lists only the methods of the
    handlers registered on the path before its OPTIONS handler was made."""

    async def hook(request: Request[Any, Any, Any]) -> Response[None] | None:
        if request.method != "OPTIONS" or (methods := allow.get(request.scope.get("path_template", ""))) is None:
            return None
        return Response(None, status_code=204, headers={"Allow": methods})

    return hook


def create_app(runtime: Runtime, *, extra_handlers: list | None = None) -> Litestar:
    http_metrics = HttpMetrics()
    allow: dict[str, str] = {}
    handlers = [
        healthz,
        readyz,
        metrics,
        download,
        LoopsTrainingController,
        TrainingCapacityController,
        LoopsRunMetricsController,
        LoopsUsageController,
        LoopsResourcesController,
        LoopsCheckpointImportController,
        LoopsDeploymentsController,
        LoopsTrainerPlaneController,
        LoopsSamplerPlaneController,
        SamplerStatusController,
        ServedModelsController,
        ServedModelOpenAIController,
        LegacyController,
        OpenloopsController,
        console_router,
        *TINKER_HANDLERS,
        *runtime.extras.get("route_handlers", []),
        *(extra_handlers or []),
    ]
    app = Litestar(
        route_handlers=handlers,
        before_request=_options_answer(allow),
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_class=ApiRequest,
        middleware=[observability_middleware(http_metrics, runtime.settings.access_log)],
        request_max_body_size=runtime.settings.request_body_limit_bytes,
        state=State({"runtime": runtime, "http_metrics": http_metrics}),
        openapi_config=OpenAPIConfig(
            title="openloops",
            version="0.1.0",
            description="Baseten Loops management API and Tinker training API",
            path="/docs",
            render_plugins=[ExactJsonRenderPlugin(), SwaggerRenderPlugin()],
        ),
        logging_config=None,
        debug=False,
    )
    methods: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            methods.setdefault(route.path_format, set()).update(route.methods)
    allow.update({path: ", ".join(sorted(m)) for path, m in methods.items()})
    return app
