"""One control-plane process: the API server plus the background tasks that belong to it
(controller, completion consumer, telemetry consumer, futures notifier). Used by ``openloops serve`` and ``up``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import structlog
import uvicorn

from control_plane.api.app import create_app
from control_plane.controller.reconciler import Controller
from control_plane.event_loop import http_implementation
from control_plane.runtime import Runtime, build_runtime
from control_plane.settings import Settings
from control_plane.telemetry.consumer import TelemetryConsumer
from control_plane.training.completions import CompletionConsumer

log = structlog.get_logger("openloops.server")


BackgroundTask = Callable[[asyncio.Event], Coroutine[Any, Any, Any]]


def background_tasks(runtime: Runtime) -> list[BackgroundTask]:
    """Long-running coroutines of a control-plane process, each taking the stop event."""
    tasks: list[BackgroundTask] = [
        CompletionConsumer(runtime).run_forever,
        TelemetryConsumer(
            runtime.db,
            runtime.redis,
            batch_size=runtime.settings.telemetry_batch_size,
            batch_ms=runtime.settings.telemetry_batch_ms,
        ).run_forever,
        runtime.meter.run_forever,
    ]
    if runtime.backend is not None:
        tasks.append(Controller(runtime).run_forever)
    tasks.extend(runtime.extras.get("background", []))
    return tasks


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` (or whoever embeds it) owns
    SIGINT/SIGTERM and stops the server through its stop event."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    """The HTTP server settings of every API process (the benchmark's bare app uses them too).
    The event loop is the caller's (``control_plane.event_loop.run``)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_keep_alive=75,
        http=http_implementation(),
    )


def settle_heap() -> None:
    """Once the app is built: move everything allocated so far out of the collector's reach.
    What start-up allocates (modules, the app, its schemas) lives as long as the process, and
    a full collection walking it paused request handling for 100-170 ms under load."""
    gc.collect()
    gc.freeze()


async def serve(
    settings: Settings, *, on_ready: Callable[[Runtime], None] | None = None, install_signal_handlers: bool = True
) -> None:
    runtime = build_runtime(settings)
    app = create_app(runtime)
    settle_heap()
    server = _Server(uvicorn_config(app, settings.host, settings.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    bg = [asyncio.create_task(fn(stop)) for fn in background_tasks(runtime)]
    srv = asyncio.create_task(server.serve())
    try:
        while not server.started and not srv.done():  # noqa: ASYNC110 - uvicorn exposes no started event
            await asyncio.sleep(0.05)
        if srv.done():
            srv.result()
        if on_ready is not None:
            on_ready(runtime)
        await stop.wait()
    finally:
        server.should_exit = True
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(srv, 15)
        for t in bg:
            t.cancel()
        for t in bg:
            with contextlib.suppress(BaseException):
                await t
        await runtime.close()
        log.info("stopped")
