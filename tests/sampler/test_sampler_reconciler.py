"""SamplerReconciler against real Postgres/Redis with a scripted backend: one shared workload
per base model, row statuses from observations, failures fail pending futures, idle removal."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from control_plane.controller.samplers import SamplerReconciler, pending_group
from control_plane.db.models import Sampler, Session, StatusHistory
from control_plane.runtime import build_runtime
from control_plane.scheduler.protocol import Observation, Phase, WorkloadRole, WorkloadSpec
from control_plane.services import sessions as sessions_svc
from control_plane.services.samplers import is_sampler_workload_id, sampler_workload_id
from control_plane.services.sampling_sessions import open_sampling_session
from control_plane.statuses import SessionStatus
from control_plane.training.queue import TrainerQueue
from data_plane.wire import queue as q
from tests.control_plane.conftest import TEST_MODEL, make_settings, make_tenant
from tests.infra.services import TestServices


class ScriptedBackend:
    """Records ensure/remove; observe answers what the test scripted."""

    name = "scripted"

    def __init__(self) -> None:
        self.specs: dict[str, WorkloadSpec] = {}
        self.phase = Phase.STARTING
        self.reason: str | None = None
        self.removed: list[str] = []

    async def ensure(self, spec: WorkloadSpec) -> None:
        self.specs.setdefault(spec.workload_id, spec)

    async def remove(self, workload_id: str, role: WorkloadRole) -> None:
        if self.specs.pop(workload_id, None) is not None:
            self.removed.append(workload_id)

    async def scale(self, workload_id: str, role: WorkloadRole, replicas: int) -> None:
        pass

    async def observe(self, workload_id: str, role: WorkloadRole) -> Observation:
        if workload_id not in self.specs:
            return Observation(workload_id, role, Phase.ABSENT)
        endpoint = "http://127.0.0.1:9" if self.phase == Phase.READY else None
        return Observation(workload_id, role, self.phase, reason=self.reason, endpoint=endpoint)

    async def list_workloads(self) -> list[tuple[str, WorkloadRole]]:
        return [(w, WorkloadRole.SAMPLER) for w in self.specs]

    async def close(self) -> None:
        pass


@pytest.fixture
async def env(clean_state: None, services: TestServices, data_dir: Path):
    r = build_runtime(make_settings(services, data_dir), with_backend=False)
    backend = ScriptedBackend()
    r.backend = backend  # type: ignore[assignment]
    t = await make_tenant(r, "org-a")
    async with r.db.transaction() as s:
        sess = await sessions_svc.create_session(s, t.principal, origin="tinker")
        for seq in (0, 1):
            await open_sampling_session(
                s,
                org_id=t.org_id,
                created_by=t.user_id,
                session_id=sess.id,
                seq_id=seq,
                base_model=TEST_MODEL,
                checkpoint=None,
            )
    yield r, backend, sess.id
    await r.close()


async def statuses(r) -> dict[str, str]:
    async with r.db.session() as s:
        return {x.id: x.status for x in (await s.execute(select(Sampler))).scalars()}


async def test_shared_workload_statuses_and_failure(env):
    r, backend, sid = env
    rec = SamplerReconciler(r)
    wid = sampler_workload_id(TEST_MODEL)
    assert is_sampler_workload_id(wid)

    backend.phase = Phase.STARTING
    await rec.reconcile()
    assert list(backend.specs) == [wid]  # one workload for both rows
    spec = backend.specs[wid]
    assert spec.role == WorkloadRole.SAMPLER and spec.port and spec.health_path == "/health"
    assert spec.command == ["python", "-m", "data_plane.sampler"]
    assert set((await statuses(r)).values()) == {"LOADING_MODEL"}

    backend.phase = Phase.READY
    await rec.reconcile()
    assert set((await statuses(r)).values()) == {"ACTIVE"}
    async with r.db.session() as s:
        assert {x.endpoint for x in (await s.execute(select(Sampler))).scalars()} == {"http://127.0.0.1:9"}

    backend.phase = Phase.STARTING  # stopped answering its health check after serving
    await rec.reconcile()
    assert set((await statuses(r)).values()) == {"UNHEALTHY"}

    queue = TrainerQueue(r.redis)
    await queue.create_future("req-pending", run_id=pending_group(wid))
    backend.phase, backend.reason = Phase.FAILED, "worker process killed by SIGKILL"
    await rec.reconcile()
    assert set((await statuses(r)).values()) == {"FAILED"}
    assert backend.removed == [wid]
    res = await queue.read("req-pending")
    assert res is not None and res.state == q.FutureState.FAILED and b"SIGKILL" in res.body
    async with r.db.session() as s:
        hist = [
            h.to_status
            for h in (
                await s.execute(
                    select(StatusHistory)
                    .where(StatusHistory.resource_id == f"{sid}:sample:0")
                    .order_by(StatusHistory.id)
                )
            ).scalars()
        ]
    assert hist == ["DEPLOYING", "LOADING_MODEL", "ACTIVE", "UNHEALTHY", "FAILED"]


async def test_ended_sessions_release_the_workload(env):
    r, backend, sid = env
    rec = SamplerReconciler(r)
    backend.phase = Phase.READY
    await rec.reconcile()
    assert backend.specs
    async with r.db.transaction() as s:
        sess = await s.get(Session, sid)
        sess.status = SessionStatus.FINISHED.value
    await rec.reconcile()
    assert set((await statuses(r)).values()) == {"INACTIVE"}
    assert backend.specs == {} and backend.removed == [sampler_workload_id(TEST_MODEL)]
