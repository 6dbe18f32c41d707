"""The real controller loop against real trainer worker subprocesses (LocalProcessBackend).

A run created through the Loops API is started by the controller on its deployment's
trainer, moves DEPLOYING -> LOADING_MODEL -> ACTIVE as the worker loads the tiny model, takes
the run and reports READY through Redis; a SIGKILLed worker is restarted and the run resumes
(ACTIVE -> WAKING_UP -> ACTIVE, its waiting ops still pending), until it dies more often in a
row than ``run_resume_max_attempts``: then the deployment and the run are FAILED with the
signal in the reason and the run's pending futures fail (category ``server``); deactivating a live run stops its deployment's process and ends INACTIVE; a run
made with ``reuse_from_run_id`` goes on the warm worker of the earlier run. The controller is driven pass by pass with ``reconcile_once()`` until a condition
holds or a deadline passes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import select

from control_plane.api.app import create_app
from control_plane.catalog import CatalogModel, ModelCatalog
from control_plane.controller.reconciler import Controller
from control_plane.db.models import Run, StatusHistory
from control_plane.runtime import Runtime, build_runtime
from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.training.queue import TrainerQueue, read_hash
from data_plane.wire import op_bodies
from data_plane.wire import queue as q
from tests.control_plane.conftest import TEST_MODEL, Tenant, make_settings, make_tenant

if TYPE_CHECKING:
    from tests.infra.services import TestServices

DEADLINE_S = 120.0  # generous: worker start is ~6 s on 2 busy cores


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_plane.models import build_tiny

    d = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny(d, "tiny", seed=0)
    return d


@dataclass
class Stack:
    runtime: Runtime
    controller: Controller
    client: httpx.AsyncClient
    tenant: Tenant

    @property
    def backend(self) -> LocalProcessBackend:
        assert isinstance(self.runtime.backend, LocalProcessBackend)
        return self.runtime.backend

    async def drive(self, what: str, done: Callable[[], Awaitable[bool]]) -> None:
        """Run controller passes until ``done()`` holds; fail with the worker logs at the deadline."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            await self.controller.reconcile_once()
            if await done():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-3000:] for p in self.runtime.settings.data_dir.glob("workers/*.log"))
                pytest.fail(f"timed out waiting for {what}; worker logs:\n{logs}")
            await asyncio.sleep(0.2)

    async def run_row(self, run_id: str) -> Run:
        async with self.runtime.db.session() as s:
            row = await s.get(Run, run_id)
            assert row is not None
            return row

    async def history(self, run_id: str) -> list[StatusHistory]:
        async with self.runtime.db.session() as s:
            q_ = (
                select(StatusHistory)
                .where(StatusHistory.resource_type == "run", StatusHistory.resource_id == run_id)
                .order_by(StatusHistory.id)
            )
            return list((await s.execute(q_)).scalars())

    async def status_is(self, run_id: str, *statuses: str) -> bool:
        return (await self.run_row(run_id)).status in statuses

    async def create_run(self, **extra: object) -> dict:
        h = self.tenant.headers
        r = await self.client.post("/v1/loops/sessions", headers=h, json={})
        assert r.status_code == 200, r.text
        r = await self.client.post(
            "/v1/loops/runs",
            headers=h,
            json={"session_id": r.json()["session"]["id"], "base_model": TEST_MODEL, "lora_rank": 4, **extra},
        )
        assert r.status_code == 200, r.text
        return r.json()["run"]

    async def start_active_run(self, **extra: object) -> dict:
        run = await self.create_run(**extra)
        assert run["status"]["name"] == "DEPLOYING"
        await self.drive(
            "the run to become ACTIVE", lambda: self.status_is(run["id"], "ACTIVE", "FAILED", "DEPLOY_FAILED")
        )
        row = await self.run_row(run["id"])
        assert row.status == "ACTIVE", row.status_reason
        return run

    async def pending_op(self, run_id: str) -> str:
        """An op the worker will not reach: seq 5 while seq 1 never comes."""
        body = op_bodies.encode(op_bodies.OptimStepBody(op_bodies.AdamSpec(learning_rate=1e-3)))
        rid, is_new = await TrainerQueue(self.runtime.redis).submit(run_id, run_id, 5, q.OpKind.OPTIM_STEP, body)
        assert is_new
        return rid

    async def future(self, request_id: str) -> q.FutureResult:
        res = await TrainerQueue(self.runtime.redis).read(request_id)
        assert res is not None, f"future {request_id} is gone"
        return res


@pytest.fixture
async def stack(
    clean_state: None, services: TestServices, data_dir: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stack]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the workers: 2 cores, shared
    settings = make_settings(services, data_dir)
    # the real tiny model, trainable but not sampleable: the run gets no paired sampler, so
    # no vLLM server is started
    ModelCatalog(
        [CatalogModel(name=TEST_MODEL, source=str(tiny_model), max_context_length=512, sampleable=False)]
    ).dump(settings.resolved_catalog_path)
    runtime = build_runtime(settings)
    tenant = await make_tenant(runtime, "acme")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)), base_url="http://testserver"
    ) as client:
        try:
            yield Stack(runtime, Controller(runtime), client, tenant)
        finally:
            await runtime.close()  # stops any worker still running


async def test_a_killed_worker_is_restarted_and_the_run_resumes_until_attempts_run_out(stack: Stack) -> None:
    run = await stack.start_active_run()
    run_id, dep_id = run["id"], run["deployment_id"]
    steps = [(h.from_status, h.to_status) for h in await stack.history(run_id)]
    assert steps == [(None, "DEPLOYING"), ("DEPLOYING", "LOADING_MODEL"), ("LOADING_MODEL", "ACTIVE")]
    pid = stack.backend.pid(dep_id, WorkloadRole.TRAINER)
    assert pid is not None
    state = await read_hash(stack.runtime.redis, q.worker_state_key(dep_id))
    assert state["state"] == "ready" and int(state["pid"]) == pid and state["run_id"] == run_id
    r = await stack.client.get(f"/v1/loops/runs/{run_id}", headers=stack.tenant.headers)
    assert r.json()["run"]["status"]["name"] == "ACTIVE"

    # the API's seq-0 create op really ran in that worker
    create_rid = (await stack.runtime.redis.get(q.seq_claim_key(run_id, 0))).decode()
    await stack.drive("the create op to finish", lambda: _settled(stack, create_rid))
    assert (await stack.future(create_rid)).state == q.FutureState.DONE

    # SIGKILL: the controller restarts the trainer, which resumes the run (WAKING_UP, then ACTIVE)
    waiting = await stack.pending_op(run_id)
    assert (await stack.future(waiting)).state == q.FutureState.PENDING
    os.kill(pid, signal.SIGKILL)
    await stack.drive("the run to come back", lambda: _resumed(stack, run_id, 1))
    history = await stack.history(run_id)
    back = [(h.from_status, h.to_status) for h in history[3:]]
    assert back[0] == ("ACTIVE", "WAKING_UP") and back[-1][1] == "ACTIVE", back
    reason = history[3].reason or ""
    assert "killed by SIGKILL" in reason and "attempt 1 of 3" in reason, reason
    new_pid = stack.backend.pid(dep_id, WorkloadRole.TRAINER)
    assert new_pid is not None and new_pid != pid
    assert (await stack.future(waiting)).state == q.FutureState.PENDING  # still waiting for seq 1, not failed
    r = await stack.client.get(f"/v1/loops/deployments/{dep_id}", headers=stack.tenant.headers)
    assert r.json()["deployment"]["status"]["name"] == "RUNNING"

    # a trainer that keeps dying at the same op fails the run once the attempts run out
    stack.runtime.settings.run_resume_max_attempts = 1
    os.kill(new_pid, signal.SIGKILL)
    await stack.drive("the run to fail", lambda: stack.status_is(run_id, "FAILED"))
    row = await stack.run_row(run_id)
    assert row.status_reason and row.status_reason.startswith(f"deployment {dep_id} failed: the trainer died 2 times")
    assert "killed by SIGKILL" in row.status_reason, row.status_reason
    last = (await stack.history(run_id))[-1]
    assert (last.to_status, last.reason) == ("FAILED", row.status_reason)
    r = await stack.client.get(f"/v1/loops/runs/{run_id}", headers=stack.tenant.headers)
    assert r.json()["run"]["status"] == {"name": "FAILED", "reason": row.status_reason}

    failed = await stack.future(waiting)
    assert failed.state == q.FutureState.FAILED
    assert failed.category == q.ErrorCategory.SERVER, failed
    assert b"SIGKILL" in failed.body, failed.body
    assert await stack.runtime.redis.scard(q.run_pending_key(run_id)) == 0
    # the dead workload is forgotten (garbage-collected in the same pass), and so are the run's
    # op log and snapshots
    assert (dep_id, WorkloadRole.TRAINER) not in await stack.backend.list_workloads()
    assert not await stack.runtime.redis.exists(q.ops_stream(run_id))
    assert stack.runtime.store.list(f"snapshots/{row.org_id}/{run_id}/") == []


async def _resumed(stack: Stack, run_id: str, resumes: int) -> bool:
    state = await read_hash(stack.runtime.redis, q.run_state_key(run_id))
    return int(state.get("resumes") or 0) >= resumes and await stack.status_is(run_id, "ACTIVE")


async def test_deactivating_a_live_run_stops_its_worker(stack: Stack) -> None:
    run = await stack.start_active_run()
    run_id, dep_id = run["id"], run["deployment_id"]
    pid = stack.backend.pid(dep_id, WorkloadRole.TRAINER)
    assert pid is not None and _alive(pid)
    waiting = await stack.pending_op(run_id)

    r = await stack.client.post(f"/v1/loops/runs/{run_id}/deactivate", headers=stack.tenant.headers)
    assert r.status_code == 200, r.text
    assert (await stack.run_row(run_id)).status == "DEACTIVATING"
    await stack.drive("the run to become INACTIVE", lambda: stack.status_is(run_id, "INACTIVE", "FAILED"))

    assert (await stack.run_row(run_id)).status == "INACTIVE"
    assert not _alive(pid)
    assert stack.backend.pid(dep_id, WorkloadRole.TRAINER) is None
    # stopped by SIGTERM, it shut down cleanly and said so
    state = await stack.runtime.redis.hget(q.worker_state_key(dep_id), "state")
    assert state == q.WorkerState.STOPPED.value.encode()
    r = await stack.client.get(f"/v1/loops/deployments/{dep_id}", headers=stack.tenant.headers)
    assert r.json()["deployment"]["status"] == {"name": "STOPPED", "reason": "deactivated", "detail": "INACTIVE"}
    steps = [(h.from_status, h.to_status) for h in await stack.history(run_id)]
    assert steps[-2:] == [("ACTIVE", "DEACTIVATING"), ("DEACTIVATING", "INACTIVE")]
    failed = await stack.future(waiting)
    assert failed.state == q.FutureState.FAILED and failed.category == q.ErrorCategory.SERVER


async def test_a_new_run_reuses_the_warm_worker_of_an_earlier_run(stack: Stack) -> None:
    first = await stack.start_active_run()
    dep_id = first["deployment_id"]
    pid = stack.backend.pid(dep_id, WorkloadRole.TRAINER)
    waiting = await stack.pending_op(first["id"])

    second = await stack.create_run(reuse_from_run_id=first["id"])
    assert second["deployment_id"] == dep_id  # the warm deployment, not a new one
    # the first run is replaced at once; what it still waited for fails
    assert (await stack.run_row(first["id"])).status == "INACTIVE"
    assert (await stack.run_row(first["id"])).status_reason == f"replaced by run {second['id']} on deployment {dep_id}"
    failed = await stack.future(waiting)
    assert failed.state == q.FutureState.FAILED and b"replaced" in failed.body
    await stack.drive("the second run to become ACTIVE", lambda: stack.status_is(second["id"], "ACTIVE", "FAILED"))
    assert (await stack.run_row(second["id"])).status == "ACTIVE"
    assert stack.backend.pid(dep_id, WorkloadRole.TRAINER) == pid  # same process: no cold start
    create_rid = (await stack.runtime.redis.get(q.seq_claim_key(second["id"], 0))).decode()
    await stack.drive("the second run's create op", lambda: _settled(stack, create_rid))
    assert (await stack.future(create_rid)).state == q.FutureState.DONE
    dep = (await stack.client.get(f"/v1/loops/deployments/{dep_id}", headers=stack.tenant.headers)).json()["deployment"]
    assert (dep["active_run_id"], dep["latest_run_id"], dep["status"]["name"]) == (
        second["id"],
        second["id"],
        "RUNNING",
    )
    assert (await read_hash(stack.runtime.redis, q.run_state_key(first["id"])))["state"] == "detached"
    # a run that does not fit the warm deployment (another availability) gets one of its own
    other = await stack.create_run(reuse_from_run_id=first["id"], availability_model="spot")
    assert other["deployment_id"] != dep_id
    assert (await stack.run_row(second["id"])).status == "ACTIVE"


async def _settled(stack: Stack, request_id: str) -> bool:
    res = await TrainerQueue(stack.runtime.redis).read(request_id)
    return res is not None and res.state != q.FutureState.PENDING


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
