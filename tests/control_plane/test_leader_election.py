"""Two controllers (two runtimes on the same Postgres and Redis, each with its own Kubernetes
backend against one kmock cluster): one leads at a time through the Postgres advisory lock;
when the leader stops, or its lock connection dies, the other takes over, and between them
every run gets exactly one workload and nothing is left behind after deactivation."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from control_plane.controller.reconciler import LOCK_KEY
from control_plane.db.models import Run
from control_plane.runtime import Runtime
from control_plane.scheduler.k8s_manifests import workload_name
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.services.runs import end_run
from tests.k8s.conftest import DEPLOYMENTS, Cluster, ReplicaSetPlayer, cluster, eventually  # noqa: F401 (fixture)
from tests.k8s.controller_env import Running, history, k8s_runtime, k8s_settings, new_run, start, status, tenant

pytestmark = pytest.mark.usefixtures("clean_state")
T = 30.0


async def lock_holder(rt: Runtime) -> int | None:
    async with rt.db.engine.connect() as c:
        return (
            await c.execute(
                # advisory locks are per database; other tests' servers share the cluster
                text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = :k AND granted"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"k": LOCK_KEY},
            )
        ).scalar_one_or_none()


def leaders(*rs: Running) -> list[Running]:
    return [r for r in rs if r.controller.is_leader]


@contextlib.asynccontextmanager
async def two_controllers(services, data_dir: Path, url: str) -> AsyncIterator[tuple[Runtime, Running, Running]]:
    async with (
        k8s_runtime(k8s_settings(services, data_dir, url)) as a,
        k8s_runtime(k8s_settings(services, data_dir, url)) as b,
    ):
        ra, rb = start(a), start(b)
        try:
            yield a, ra, rb
        finally:
            for r in (ra, rb):
                if not r.task.done():
                    await r.halt()


async def one_leader_for_a_while(a: Running, b: Running, seconds: float = 1.0) -> Running:
    await eventually(lambda: len(leaders(a, b)) == 1, T, what="a leader")
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    (leader,) = leaders(a, b)
    follower = b if leader is a else a
    while loop.time() < end:
        assert leaders(a, b) == [leader]  # never two, and no flapping
        await asyncio.sleep(0.02)
    assert follower.controller.passes == 0  # only the leader reconciles
    return leader


async def all_have_one_workload(rt: Runtime, cluster: Cluster, runs: list[Run]) -> None:
    """Each run's deployment has exactly one trainer Deployment in the cluster."""
    names = {workload_name(r.deployment_id, WorkloadRole.TRAINER) for r in runs if r.deployment_id}
    await eventually(lambda: set(cluster.objects(DEPLOYMENTS)) == names, T, what="one Deployment per run")
    for r in runs:
        assert "DEPLOY_FAILED" not in [h[1] for h in await history(rt, r.deployment_id)]


async def test_leader_stops_and_the_other_takes_over(services, data_dir: Path, cluster: Cluster) -> None:
    before = {t.name for t in threading.enumerate()}
    with ReplicaSetPlayer(cluster):
        async with two_controllers(services, data_dir, cluster.url) as (rt, a, b):
            leader = await one_leader_for_a_while(a, b)
            follower = b if leader is a else a
            t = await tenant(rt)
            runs = [await new_run(rt, t) for _ in range(3)]
            await all_have_one_workload(rt, cluster, runs)

            await leader.halt()  # stops: unlocks, its connection goes back
            await eventually(lambda: follower.controller.is_leader, T, what="the follower to take over")
            assert not leader.controller.is_leader
            runs += [await new_run(rt, t) for _ in range(2)]
            await all_have_one_workload(rt, cluster, runs)  # the old ones are not duplicated

            async with rt.db.transaction() as s:
                for r in runs:
                    await end_run(s, await s.get(Run, r.id), "test done")

            async def all_inactive() -> bool:
                return {await status(rt, Run, r.id) for r in runs} == {"INACTIVE"}

            await eventually(all_inactive, T, what="every run INACTIVE")
            await eventually(lambda: cluster.objects(DEPLOYMENTS) == {}, T, what="every Deployment removed")
    leaked = {th.name for th in threading.enumerate() if th.is_alive()} - before
    assert not [n for n in leaked if n.startswith("openloops-k8s")], leaked


async def test_a_leader_whose_lock_connection_dies_steps_down(services, data_dir: Path, cluster: Cluster) -> None:
    async with two_controllers(services, data_dir, cluster.url) as (rt, a, b):
        await one_leader_for_a_while(a, b, seconds=0.3)
        pid = await lock_holder(rt)
        assert pid is not None
        async with rt.db.engine.connect() as c:  # the server drops the connection (and the lock)
            assert (await c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})).scalar() is True
            await c.commit()

        async def new_holder() -> bool:
            holder = await lock_holder(rt)
            return holder is not None and holder != pid and len(leaders(a, b)) == 1

        await eventually(new_holder, T, what="the lock held again, by a live connection")
        (now,) = leaders(a, b)
        other = b if now is a else a
        before = (now.controller.passes, other.controller.passes)
        await eventually(lambda: now.controller.passes > before[0] + 3, T, what="the new leader reconciling")
        assert other.controller.passes == before[1] and not other.controller.is_leader  # idle
        run = await new_run(rt, await tenant(rt))
        await all_have_one_workload(rt, cluster, [run])
