"""A control plane (real Postgres, Redis, object store directory) whose controller drives the
Kubernetes backend against the kmock cluster of tests/k8s/conftest.py, plus row helpers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from control_plane.controller.reconciler import Controller
from control_plane.db.models import Run, ServedModel, StatusHistory
from control_plane.runtime import Runtime, build_runtime
from control_plane.scheduler.kubernetes import KubernetesBackend
from control_plane.services import runs as runs_svc
from control_plane.services import sessions as sessions_svc
from control_plane.settings import Settings
from data_plane.wire import queue as q
from tests.control_plane.conftest import TEST_MODEL, Tenant, make_settings, make_tenant
from tests.control_plane.seed import add_checkpoint, add_served_model
from tests.infra.services import TestServices
from tests.k8s.conftest import backend_settings

FAST = dict(
    controller_interval_seconds=0.05,
    controller_lock_retry_seconds=0.05,
    backend_retry_attempts=3,
    backend_retry_base_delay_seconds=0.01,
    backend_retry_max_delay_seconds=0.02,
)


def k8s_settings(services: TestServices, data_dir: Path, api_url: str, **overrides: Any) -> Settings:
    kube = backend_settings(api_url, **overrides.pop("kube", {}))
    return make_settings(services, data_dir, backend="kubernetes", kubernetes=kube, **{**FAST, **overrides})


@contextlib.asynccontextmanager
async def k8s_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = build_runtime(settings, with_backend=False)
    runtime.backend = KubernetesBackend.from_settings(settings)
    try:
        yield runtime
    finally:
        await runtime.close()


@dataclass
class Running:
    """A controller's ``run_forever`` in a task of the test's loop."""

    controller: Controller
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


def start(runtime: Runtime) -> Running:
    ctl = Controller(runtime)
    stop = asyncio.Event()
    return Running(ctl, stop, asyncio.create_task(ctl.run_forever(stop)))


async def tenant(runtime: Runtime, org: str = "acme") -> Tenant:
    return await make_tenant(runtime, org)


async def new_run(runtime: Runtime, t: Tenant, **kw: Any) -> Run:
    async with runtime.db.transaction() as s:
        sess = await sessions_svc.create_session(s, t.principal, origin="loops")
        req = runs_svc.RunRequest(session_id=sess.id, base_model=TEST_MODEL, with_sampler=False, **kw)
        created = await runs_svc.create_run(
            s, t.principal, runtime.catalog, req, runtime.settings.default_scale_down_delay_seconds
        )
    return created.run


async def new_served_model(runtime: Runtime, t: Tenant, *, scale_down_delay_seconds: int = 3600) -> ServedModel:
    run = await new_run(runtime, t)
    ckpt = await add_checkpoint(runtime, t, run.id, "step-1")
    sm = await add_served_model(runtime, t, ckpt)
    async with runtime.db.transaction() as s:
        row = await s.get(ServedModel, sm.id)
        assert row is not None
        row.scale_down_delay_seconds = scale_down_delay_seconds
    return sm


async def row(runtime: Runtime, model: Any, rid: str) -> Any:
    async with runtime.db.session() as s:
        return await s.get(model, rid)


async def status(runtime: Runtime, model: Any, rid: str) -> str:
    r = await row(runtime, model, rid)
    return str(r.status)


async def history(runtime: Runtime, rid: str) -> list[tuple[str | None, str, str | None]]:
    async with runtime.db.session() as s:
        rows = (
            await s.execute(select(StatusHistory).where(StatusHistory.resource_id == rid).order_by(StatusHistory.id))
        ).scalars()
        return [(h.from_status, h.to_status, h.reason) for h in rows]


async def trainer_reports(runtime: Runtime, run: Run, state: q.WorkerState, detail: str | None = None) -> None:
    """What a trainer worker writes about itself and the run it executes
    (data_plane/trainer/worker.py)."""
    assert run.deployment_id is not None
    fields = {"state": state.value, "run_id": run.id}
    if detail:
        fields["detail"] = detail
    await runtime.redis.hset(q.worker_state_key(run.deployment_id), mapping=fields)
    await runtime.redis.hset(q.run_state_key(run.id), mapping={"state": q.RunState.ATTACHED.value, "next_seq": "0"})


class FlakyProxy:
    """A TCP proxy in front of the emulator that can refuse service: while ``down``, every
    connection (new and open) is cut, as when the API server is unreachable."""

    def __init__(self, target_url: str) -> None:
        host, port = target_url.removeprefix("http://").split(":")
        self._target = (host, int(port))
        self.down = False
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._srv.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.down:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
            with self._lock:
                self._socks.discard(s)

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:
            with self._lock:
                socks = list(self._socks)
            for s in socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.set_down(True)
        self._srv.close()
