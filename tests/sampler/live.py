"""A live control plane for sampling tests: API server (uvicorn, real HTTP) plus the controller
with the local process backend, in a background thread with its own event loop, on its own
database and Redis db (so other tests' TRUNCATE/FLUSHDB never touch its rows). The controller
starts the tiny model's vLLM sampler through the product path (``sampler_spec`` ->
``LocalProcessBackend`` -> ``python -m data_plane.sampler``) when a sampler row exists.

Tests talk to it over HTTP (httpx, the unmodified tinker SDK) and run coroutines on its loop
with :meth:`LiveStack.call` (DB checks, Redis reads, the backend's pids).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from control_plane.controller.workloads import sampler_workload_id
from control_plane.runtime import Runtime
from control_plane.scheduler.protocol import WorkloadRole
from tests.control_plane.conftest import TEST_MODEL, Tenant, make_settings, make_tenant
from tests.infra.services import TestServices
from tests.infra.vllm_server import free_port

T = TypeVar("T")
START_TIMEOUT_S = 60.0


async def create_database(admin_url: str, name: str) -> str:
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


def redis_db(url: str, db: int) -> str:
    base, _, last = url.rpartition("/")
    return f"{base}/{db}" if last.isdigit() else f"{url.rstrip('/')}/{db}"


@dataclass
class LiveStack:
    base_url: str
    runtime: Runtime
    loop: asyncio.AbstractEventLoop
    tenant: Tenant
    data_dir: Path
    base_model: str = TEST_MODEL

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.tenant.key}

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60.0, trust_env=False)

    @property
    def sampler_workload(self) -> str:
        return sampler_workload_id(self.base_model)

    def sampler_pid(self) -> int | None:
        backend = self.runtime.backend
        return backend.pid(self.sampler_workload, WorkloadRole.SAMPLER)  # type: ignore[union-attr]


def _handlers_missing(app: Any) -> list[Any]:
    from control_plane.api.tinker.sampling import SAMPLING_HANDLERS

    paths = {route.path for route in app.routes}
    return [] if "/api/v1/asample" in paths else list(SAMPLING_HANDLERS)


@contextlib.contextmanager
def run_live_stack(services: TestServices, data_dir: Path, *, db_name: str, redis_index: int) -> Iterator[LiveStack]:
    import uvicorn

    from control_plane.api.app import create_app
    from control_plane.controller.reconciler import Controller
    from control_plane.db import migrate
    from control_plane.runtime import build_runtime
    from data_plane.models import build_tiny

    build_tiny(data_dir / "models" / "tiny", preset="tiny", seed=0)
    db_url = asyncio.run(create_database(services.database_url, db_name))
    migrate.upgrade(db_url)
    port = free_port()
    settings = make_settings(
        services, data_dir, database_url=db_url, redis_url=redis_db(services.redis_url, redis_index),
        port=port, public_base_url=f"http://127.0.0.1:{port}", controller_interval_seconds=0.5,
    )
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        runtime = build_runtime(settings)
        await runtime.redis.flushdb()
        app = create_app(runtime)
        missing = _handlers_missing(app)
        if missing:
            app = create_app(runtime, extra_handlers=missing)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                               lifespan="off", loop="asyncio", http="h11"))
        stop = asyncio.Event()
        state.update(runtime=runtime, server=server, stop=stop)
        controller = asyncio.create_task(Controller(runtime).run_forever(stop))
        srv = asyncio.create_task(server.serve())
        while not server.started and not srv.done():
            await asyncio.sleep(0.05)
        state["tenant"] = await make_tenant(runtime, "sampling-org")
        ready.set()
        await stop.wait()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(srv, 10)
        controller.cancel()
        with contextlib.suppress(BaseException):
            await controller
        from control_plane.sampling.dispatcher import dispatcher_for

        await dispatcher_for(runtime).aclose()
        await runtime.close()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by the waiting fixture
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="openloops-live", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not ready.wait(0.2):
        if time.monotonic() - t0 > START_TIMEOUT_S:
            raise RuntimeError("live control plane did not start")
    if "error" in state:
        raise state["error"]
    stack = LiveStack(f"http://127.0.0.1:{port}", state["runtime"], loop, state["tenant"], data_dir)
    try:
        yield stack
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(60)


# --- one stack per test session, shared by every directory that asks for it ---------------

_shared: dict[str, Any] = {}


def acquire_shared_stack(services: TestServices, data_dir: Path) -> LiveStack:
    """The session's live stack (started on first use). Pair with :func:`release_shared_stack`:
    the fixtures of several conftests share it, the last release stops it."""
    if "stack" not in _shared:
        cm = run_live_stack(services, data_dir, db_name="openloops_sampling", redis_index=3)
        _shared["stack"] = cm.__enter__()
        _shared["cm"] = cm
        _shared["refs"] = 0
    _shared["refs"] += 1
    return _shared["stack"]  # type: ignore[no-any-return]


def release_shared_stack() -> None:
    _shared["refs"] -= 1
    if _shared["refs"] == 0:
        cm = _shared.pop("cm")
        _shared.clear()
        cm.__exit__(None, None, None)


def wait_status(stack: LiveStack, sampler_id: str, statuses: set[str], timeout_s: float = 600.0) -> dict[str, Any]:
    """Poll the Loops GET until the sampler is in one of ``statuses`` (fails the test otherwise)."""
    deadline = time.monotonic() + timeout_s
    with stack.http() as c:
        while True:
            r = c.get(f"/v1/loops/samplers/{sampler_id}")
            r.raise_for_status()
            smp = r.json()["sampler"]
            if smp["status"]["name"] in statuses:
                return smp  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise AssertionError(f"sampler {sampler_id} stayed {smp['status']} (wanted {statuses})")
            time.sleep(0.25)


def serving_sampler(stack: LiveStack):  # type: ignore[no-untyped-def]
    """Start (through the controller) and return the shared vLLM server as a ``VLLMServer``;
    a standalone Loops sampler keeps it alive for the session."""
    from control_plane.db.models import Sampler
    from tests.infra.vllm_server import VLLMServer

    if "vllm" in stack.__dict__:
        return stack.__dict__["vllm"]
    t0 = time.monotonic()
    with stack.http() as c:
        sess = c.post("/v1/loops/sessions", json={}).json()["session"]["id"]
        smp = c.post("/v1/loops/samplers", json={"session_id": sess, "base_model": stack.base_model}).json()["sampler"]
    wait_status(stack, smp["id"], {"ACTIVE"})

    async def endpoint() -> str:
        async with stack.runtime.db.session() as s:
            row = await s.get(Sampler, smp["id"])
            assert row is not None and row.endpoint
            return row.endpoint

    wid = stack.sampler_workload
    server = VLLMServer(
        base_url=stack.call(endpoint()),
        model_dir=stack.data_dir / "models" / "tiny",
        store_root=stack.data_dir / "objects",
        cache_dir=stack.data_dir / "sampler-cache" / wid,
        served_model_name=stack.base_model,
        proc=None,  # type: ignore[arg-type]  (owned by the controller's backend)
        log_path=stack.data_dir / "workers" / f"sampler-{wid}.log",
        start_seconds=time.monotonic() - t0,
        max_model_len=512,
        extra={"keepalive_sampler_id": smp["id"]},
    )
    print(f"\n[live_stack] shared sampler ACTIVE after {server.start_seconds:.1f} s at {server.base_url}")
    stack.__dict__["vllm"] = server
    return server
