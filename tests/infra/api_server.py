"""The API server alone on a real port: ``create_app`` under uvicorn, in a thread with its own
event loop, against the test PostgreSQL and Redis. No controller and no scheduler backend run,
so rows that ask for workers (runs, samplers) are written and answered about, and no worker
process is ever started. For tests that drive the HTTP surface from outside (schemathesis)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from control_plane.api.app import create_app
from control_plane.runtime import Runtime, build_runtime
from control_plane.server import uvicorn_config
from control_plane.settings import Settings


@dataclass
class ApiServer:
    settings: Settings
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _server: uvicorn.Server | None = None
    _runtime: Runtime | None = None
    _error: list[BaseException] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None
        return self._runtime

    def call(self, coro: Any, timeout_s: float = 60.0) -> Any:
        """Run a coroutine on the server's loop (queries through its runtime)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def start(self, timeout_s: float = 60.0) -> None:
        ready = threading.Event()

        async def _serve() -> None:
            self._runtime = build_runtime(self.settings, with_backend=False)
            app = create_app(self._runtime)
            self._server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.settings.port))
            task = asyncio.create_task(self._server.serve())
            try:
                while not self._server.started and not task.done():  # noqa: ASYNC110 - no started event
                    await asyncio.sleep(0.02)
                ready.set()
                await task
            finally:
                await self._runtime.close()

        def _main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(_serve())
            except BaseException as exc:
                self._error.append(exc)
            finally:
                ready.set()
                loop.close()

        self._thread = threading.Thread(target=_main, name="openloops-api", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s) or self._error or self._server is None or not self._server.started:
            raise RuntimeError(f"API server did not start: {self._error!r}")

    def stop(self) -> None:
        if self._server is not None and self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(setattr, self._server, "should_exit", True)
        if self._thread is not None:
            self._thread.join(30)
