"""Durable runs on Kubernetes (kmock, real Postgres and Redis, a running controller): a run
survives its trainer pod going away, and its deployment scales to zero and back.

* A deleted trainer pod (a spot preemption, a node drain) is replaced by the Deployment's
  ReplicaSet; the run shows WAKING_UP until the worker on the new pod says READY (the old
  worker's READY does not count), then ACTIVE again, never FAILED, on the same Deployment.
* An idle deployment scales to zero (the Deployment at 0 replicas) and an op waiting on its
  run wakes it without any request waiting; a pending op keeps an idle deployment up.
* Tinker session heartbeats (the real API route) are not activity: a run that only gets
  heartbeats still scales to zero.

``ReplicaSetPlayer`` or ``Kubelet`` play the cluster, ``trainer_reports`` writes what a trainer
worker writes to Redis; nothing of ours is patched.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from control_plane.api.app import create_app
from control_plane.controller.resume import resume_key
from control_plane.db.models import Deployment, Run, Session
from control_plane.runtime import Runtime
from control_plane.scheduler.k8s_manifests import LABEL_WORKLOAD, workload_name
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.statuses import SessionStatus
from control_plane.training.queue import TrainerQueue, read_hash
from data_plane.wire import queue as q
from tests.control_plane.conftest import TEST_MODEL, Tenant
from tests.k8s.conftest import DEPLOYMENTS, PODS, Cluster, Kubelet, ReplicaSetPlayer, eventually, running
from tests.k8s.controller_env import (
    Running,
    history,
    k8s_runtime,
    k8s_settings,
    new_run,
    row,
    start,
    status,
    tenant,
    trainer_reports,
)

pytestmark = pytest.mark.usefixtures("clean_state")
T = 30.0  # deadline for anything the controller does (generous: slow, shared CI machines)
IDLE_REASON = re.compile(r"idle for \d+s \(scale_down_delay_seconds=1\)")


# --- helpers ------------------------------------------------------------------------------


def trainer_name(run: Run) -> str:
    """The trainer Deployment a run executes on: its deployment's."""
    assert run.deployment_id is not None
    return workload_name(run.deployment_id, WorkloadRole.TRAINER)


def pods_of(cluster: Cluster, name: str) -> list[str]:
    return [p for p, obj in cluster.objects(PODS).items() if obj["metadata"]["labels"].get(LABEL_WORKLOAD) == name]


def replicas(cluster: Cluster, name: str) -> int | None:
    dep = cluster.get(DEPLOYMENTS, name)
    return None if dep is None else int(dep["spec"]["replicas"])


def uid_of(cluster: Cluster, name: str) -> str:
    dep = cluster.get(DEPLOYMENTS, name)
    assert dep is not None, f"no Deployment {name}"
    return str(dep["metadata"]["uid"])


def collapse(statuses: list[str]) -> list[str]:
    """Consecutive repeats (same status, new reason) folded."""
    return [x for i, x in enumerate(statuses) if i == 0 or statuses[i - 1] != x]


async def statuses(rt: Runtime, rid: str) -> list[str]:
    return collapse([h[1] for h in await history(rt, rid)])


async def wait_status(rt: Runtime, model: type[Run] | type[Deployment], rid: str, want: str) -> None:
    async def check() -> bool:
        return await status(rt, model, rid) == want

    await eventually(check, T, what=f"{model.__name__} {rid} {want}")


async def passes(ctl: Running, n: int = 10) -> None:
    """Let the running controller complete ``n`` more passes (it had every chance to act)."""
    target = ctl.controller.passes + n + 1
    await eventually(lambda: ctl.controller.passes >= target, T, what=f"{n} controller passes")


async def idle_for(ctl: Running, seconds: float) -> None:
    """Let ``seconds`` pass, with the controller passing over everything meanwhile."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    await eventually(lambda: loop.time() >= end, seconds + T, what=f"{seconds}s to pass")
    await passes(ctl)


async def set_scale_down_delay(rt: Runtime, deployment_id: str, seconds: int) -> None:
    async with rt.db.transaction() as s:
        await s.execute(
            update(Deployment).where(Deployment.id == deployment_id).values(scale_down_delay_seconds=seconds)
        )


async def worker_state(rt: Runtime, run: Run) -> dict[str, str]:
    assert run.deployment_id is not None
    return await read_hash(rt.redis, q.worker_state_key(run.deployment_id))


async def bring_up(rt: Runtime, cluster: Cluster, run: Run) -> None:
    """With a ``ReplicaSetPlayer`` making the pod: the worker loads the model, takes the run
    and says READY; the deployment and the run become ACTIVE."""
    await eventually(lambda: len(pods_of(cluster, trainer_name(run))) == 1, T, what="the trainer pod")
    await trainer_reports(rt, run, q.WorkerState.READY)
    assert run.deployment_id is not None
    await wait_status(rt, Deployment, run.deployment_id, "ACTIVE")
    await wait_status(rt, Run, run.id, "ACTIVE")


async def scaled_to_zero(rt: Runtime, cluster: Cluster, run: Run) -> None:
    """The deployment and its run are SCALED_TO_ZERO (idle), the Deployment at 0 replicas
    without pods."""
    assert run.deployment_id is not None
    name = trainer_name(run)
    await wait_status(rt, Deployment, run.deployment_id, "SCALED_TO_ZERO")
    await wait_status(rt, Run, run.id, "SCALED_TO_ZERO")
    await eventually(lambda: replicas(cluster, name) == 0, T, what="the trainer Deployment at 0 replicas")
    await eventually(lambda: not pods_of(cluster, name), T, what="the trainer pod gone")
    (_, to, reason) = (await history(rt, run.deployment_id))[-1]
    assert to == "SCALED_TO_ZERO" and reason is not None and IDLE_REASON.fullmatch(reason), reason


# --- a trainer pod deleted ------------------------------------------------------------------


async def test_a_deleted_trainer_pod_is_replaced_and_its_run_resumes_on_the_new_pod(
    services, data_dir: Path, cluster: Cluster, kubelet: Kubelet
) -> None:
    """The pods are made by hand (``Kubelet``) so that the replacement can be seen Pending, then
    running before its worker has loaded anything, as on a real cluster."""
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        run = await new_run(rt, await tenant(rt))
        dep_id = run.deployment_id
        assert dep_id is not None
        name = trainer_name(run)
        ctl = start(rt)
        try:
            await eventually(lambda: cluster.get(DEPLOYMENTS, name) is not None, T, what="the trainer Deployment")
            old = kubelet.create_pod(name, "old01", status=running("trainer", ready=True, started=True))
            await trainer_reports(rt, run, q.WorkerState.READY)
            await wait_status(rt, Run, run.id, "ACTIVE")
            uid = uid_of(cluster, name)

            # the pod goes (a spot preemption, a node drain); its worker could not say goodbye:
            # its READY is still in the worker-state hash
            kubelet.delete_pod(old)
            await wait_status(rt, Deployment, dep_id, "WAKING_UP")
            await wait_status(rt, Run, run.id, "WAKING_UP")
            (_, _, reason) = (await history(rt, dep_id))[-1]
            assert reason == (
                f"the trainer pod went away (waiting for pods to be created); run {run.id} resumes on the "
                "new pod from its snapshot and op log"
            )
            assert await worker_state(rt, run) == {}  # the gone worker's READY does not count

            # the ReplicaSet makes a new pod: scheduled, then running, its worker not loaded yet
            new = kubelet.create_pod(name, "new01")
            await passes(ctl)
            assert await status(rt, Deployment, dep_id) == "WAKING_UP"
            kubelet.set_status(new, running("trainer", ready=True, started=True))
            await passes(ctl)
            assert await status(rt, Deployment, dep_id) == "WAKING_UP"
            assert await status(rt, Run, run.id) == "WAKING_UP"
            await trainer_reports(rt, run, q.WorkerState.LOADING)  # the new worker starts
            await passes(ctl)
            assert await status(rt, Deployment, dep_id) == "WAKING_UP"
            assert await status(rt, Run, run.id) == "WAKING_UP"

            await trainer_reports(rt, run, q.WorkerState.READY)  # restored the run, took it
            await wait_status(rt, Deployment, dep_id, "ACTIVE")
            await wait_status(rt, Run, run.id, "ACTIVE")
        finally:
            await ctl.halt()
        assert uid_of(cluster, name) == uid  # the ReplicaSet replaced the pod: not recreated
        assert pods_of(cluster, name) == [new]
        assert (await statuses(rt, run.id))[-3:] == ["ACTIVE", "WAKING_UP", "ACTIVE"]
        assert (await statuses(rt, dep_id))[-3:] == ["ACTIVE", "WAKING_UP", "ACTIVE"]
        assert "FAILED" not in await statuses(rt, run.id)
        # not a death of the trainer's own making: no resume attempt counted against the run
        assert not await rt.redis.exists(resume_key(dep_id))


# --- scale to zero and back ------------------------------------------------------------------


async def test_an_idle_trainer_scales_to_zero_and_an_op_waiting_on_its_run_wakes_it(
    services, data_dir: Path, cluster: Cluster
) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        run = await new_run(rt, await tenant(rt))
        dep_id = run.deployment_id
        assert dep_id is not None
        await set_scale_down_delay(rt, dep_id, 1)
        name = trainer_name(run)
        with ReplicaSetPlayer(cluster):
            ctl = start(rt)
            try:
                await bring_up(rt, cluster, run)
                uid = uid_of(cluster, name)
                await scaled_to_zero(rt, cluster, run)  # nothing happened for 1 s
                assert (await worker_state(rt, run))["state"] == "ready"  # what the old worker left

                # an op is submitted (no request waits for the wake-up: the client polls its future)
                await rt.redis.sadd(q.run_pending_key(run.id), "req-waiting")
                await wait_status(rt, Deployment, dep_id, "WAKING_UP")
                await eventually(lambda: replicas(cluster, name) == 1, T, what="the trainer Deployment back at 1")
                assert await worker_state(rt, run) == {}  # cleared before scaling up: READY must be new
                await eventually(lambda: len(pods_of(cluster, name)) == 1, T, what="a new trainer pod")
                await passes(ctl)
                assert await status(rt, Deployment, dep_id) == "WAKING_UP"  # pod up, worker not READY
                assert await status(rt, Run, run.id) == "WAKING_UP"

                await trainer_reports(rt, run, q.WorkerState.READY)
                await wait_status(rt, Deployment, dep_id, "ACTIVE")
                await wait_status(rt, Run, run.id, "ACTIVE")
            finally:
                await ctl.halt()
        assert uid_of(cluster, name) == uid  # scaled down and up, never recreated
        hist = await history(rt, dep_id)
        assert [(h[1], h[2]) for h in hist[-2:]] == [
            ("WAKING_UP", f"woken by an op waiting on run {run.id}"),
            ("ACTIVE", "trainer is back"),
        ]
        assert [h[1] for h in hist[-3:]] == ["SCALED_TO_ZERO", "WAKING_UP", "ACTIVE"]
        assert (await statuses(rt, run.id))[-4:] == ["ACTIVE", "SCALED_TO_ZERO", "WAKING_UP", "ACTIVE"]


async def test_a_pending_op_keeps_an_idle_trainer_up(services, data_dir: Path, cluster: Cluster) -> None:
    """An op in flight or queued is activity however long it takes (e.g. a long
    forward_backward): the trainer is not scaled down under it; once answered, it is."""
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        run = await new_run(rt, await tenant(rt))
        dep_id = run.deployment_id
        assert dep_id is not None
        await set_scale_down_delay(rt, dep_id, 1)
        with ReplicaSetPlayer(cluster):
            ctl = start(rt)
            try:
                await bring_up(rt, cluster, run)
                await rt.redis.sadd(q.run_pending_key(run.id), "req-long")
                await idle_for(ctl, 3)  # three times the delay, with no other activity
                assert await status(rt, Deployment, dep_id) == "ACTIVE"
                assert "SCALED_TO_ZERO" not in await statuses(rt, dep_id)
                assert replicas(cluster, trainer_name(run)) == 1

                await TrainerQueue(rt.redis).complete(run.id, "req-long", q.FutureResult.ok_json({}))
                await scaled_to_zero(rt, cluster, run)
            finally:
                await ctl.halt()


# --- heartbeats are not activity ------------------------------------------------------------


async def heartbeats(client: httpx.AsyncClient, t: Tenant, session_id: str, sent: list[int]) -> None:
    """What the Tinker SDK does while a training client exists: a heartbeat every so often."""
    while True:
        res = await client.post("/api/v1/session_heartbeat", json={"session_id": session_id}, headers=t.headers)
        sent.append(res.status_code)
        await asyncio.sleep(0.1)


async def test_session_heartbeats_do_not_keep_a_run_awake(services, data_dir: Path, cluster: Cluster) -> None:
    """A Tinker run (made through the API, so it takes OPENLOOPS_RUN_SCALE_DOWN_DELAY_SECONDS,
    1 s here) whose client only sends session heartbeats scales to zero like any idle run."""
    settings = k8s_settings(services, data_dir, cluster.url, run_scale_down_delay_seconds=1)
    async with k8s_runtime(settings) as rt:
        t = await tenant(rt)
        transport = httpx.ASGITransport(app=create_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=t.headers) as c:
            res = await c.post(
                "/api/v1/create_session", json={"tags": [], "user_metadata": {}, "type": "create_session"}
            )
            assert res.status_code == 200, res.text
            session_id = res.json()["session_id"]
            res = await c.post(
                "/api/v1/create_model",
                json={
                    "session_id": session_id,
                    "model_seq_id": 0,
                    "base_model": TEST_MODEL,
                    "lora_config": {"rank": 8},
                },
            )
            assert res.status_code == 200, res.text
            create_op = res.json()["request_id"]
            run = await row(rt, Run, res.json()["model_id"])
            assert run.deployment_id is not None
            assert (await row(rt, Deployment, run.deployment_id)).scale_down_delay_seconds == 1

            sent: list[int] = []
            with ReplicaSetPlayer(cluster):
                ctl = start(rt)
                beating = asyncio.create_task(heartbeats(c, t, session_id, sent))
                try:
                    await bring_up(rt, cluster, run)
                    await TrainerQueue(rt.redis).complete(run.id, create_op, q.FutureResult.ok_json({}))  # the worker
                    active_at, before = datetime.now(UTC), len(sent)
                    await scaled_to_zero(rt, cluster, run)  # heartbeats all along
                    during = len(sent) - before
                    await passes(ctl)  # the heartbeats since then are flushed too
                finally:
                    beating.cancel()
                    await asyncio.gather(beating, return_exceptions=True)
                    await ctl.halt()
            assert during >= 3 and set(sent) == {200}, sent  # heartbeats went on, every one accepted
            sess = await row(rt, Session, session_id)
            assert sess.status == SessionStatus.ACTIVE.value  # the session lives on ...
            assert sess.last_heartbeat_at > active_at  # ... it heard heartbeats while the run went idle
            assert await status(rt, Run, run.id) == "SCALED_TO_ZERO"  # ... but its run sleeps
