"""Sampling tests run against the session's live openloops server (``live_server`` in
tests/conftest.py: the real ``serve()`` with the controller and the local process backend, in a
thread). Its controller starts the tiny model's vLLM sampler through the product path
(``sampler_spec`` -> ``LocalProcessBackend`` -> ``python -m data_plane.sampler``) when the first
sampler row exists, so the whole test session shares one vLLM server.

:class:`LiveStack` adds what sampling tests need on top of it: HTTP clients with the tenant's
key, the shared sampler's workload id and pid, and :func:`serving_sampler`, which starts the
sampler (a standalone Loops sampler keeps it alive) and describes it as a ``VLLMServer``.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from control_plane.runtime import Runtime
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.services.samplers import sampler_workload_id
from tests.infra.live_server import LiveServer

T = TypeVar("T")


@dataclass
class LiveStack:
    server: LiveServer

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def runtime(self) -> Runtime:
        return self.server.runtime

    @property
    def api_key(self) -> str:
        return self.server.api_key

    @property
    def base_model(self) -> str:
        return self.server.model.name

    @property
    def model_dir(self) -> Path:
        return Path(self.server.model.source)

    @property
    def data_dir(self) -> Path:
        return self.server.settings.data_dir

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.server.call(coro, timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60.0, trust_env=False)

    @property
    def sampler_workload(self) -> str:
        return sampler_workload_id(self.base_model)

    def sampler_pid(self) -> int | None:
        backend = self.runtime.backend
        return backend.pid(self.sampler_workload, WorkloadRole.SAMPLER)  # type: ignore[union-attr]


def wait_status(stack: LiveStack, sampler_id: str, statuses: set[str], timeout_s: float = 600.0) -> dict[str, Any]:
    """Poll the Loops GET until the sampler is in one of ``statuses`` (fails the test otherwise)."""
    deadline = time.monotonic() + timeout_s
    with stack.http() as c:
        while True:
            r = c.get(f"/v1/loops/samplers/{sampler_id}")
            r.raise_for_status()
            smp = r.json()["sampler"]
            if smp["status"]["name"] in statuses:
                return smp
            if time.monotonic() > deadline:
                raise AssertionError(f"sampler {sampler_id} stayed {smp['status']} (wanted {statuses})")
            time.sleep(0.25)


def serving_sampler(stack: LiveStack):
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
        model_dir=stack.model_dir,
        store_root=stack.runtime.settings.resolved_store_root,
        cache_dir=stack.data_dir / "sampler-cache" / wid,
        served_model_name=stack.base_model,
        proc=None,  # type: ignore[arg-type]  (owned by the controller's backend)
        log_path=stack.data_dir / "workers" / f"sampler-{wid}.log",
        start_seconds=time.monotonic() - t0,
        max_model_len=stack.server.model.max_context_length,
        extra={"keepalive_sampler_id": smp["id"]},
    )
    print(f"\n[live_stack] shared sampler ACTIVE after {server.start_seconds:.1f} s at {server.base_url}")
    stack.__dict__["vllm"] = server
    return server
