"""The controller with the Kubernetes backend against kmock, on real Postgres and Redis:
workloads created from rows (a run's deployment owns its trainer), statuses from pods (with
history rows; a run follows its deployment), transient API errors retried with backoff,
permanent ones failing at once, restarts without duplicates.

Nothing of ours is patched: the emulator answers (or refuses) requests, ``Kubelet`` plays the
cluster, ``trainer_reports`` writes what a trainer worker writes to Redis.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from control_plane.controller.reconciler import Controller
from control_plane.db.models import Deployment, Run, ServedModel
from control_plane.scheduler.k8s_manifests import workload_name
from control_plane.scheduler.protocol import WorkloadRole
from data_plane.wire import queue as q
from tests.k8s.conftest import (
    DEPLOYMENTS,
    NAMESPACE,
    PODS,
    SERVICES,
    Cluster,
    Kubelet,
    eventually,
    running,
    terminated,
    waiting,
)
from tests.k8s.controller_env import (
    FlakyProxy,
    history,
    k8s_runtime,
    k8s_settings,
    new_run,
    new_served_model,
    status,
    tenant,
    trainer_reports,
)

pytestmark = pytest.mark.usefixtures("clean_state")
T = 30.0  # deadline for what the controller does (generous: CI machines are slow and shared)


def collapse(statuses: list[str]) -> list[str]:
    """Consecutive repeats (same status, new reason) folded."""
    return [x for i, x in enumerate(statuses) if i == 0 or statuses[i - 1] != x]


def trainer_name(run: Run) -> str:
    """The trainer workload a run executes on: its deployment's."""
    assert run.deployment_id is not None
    return workload_name(run.deployment_id, WorkloadRole.TRAINER)


async def test_run_lifecycle_from_pods_and_worker_state(
    services, data_dir: Path, cluster: Cluster, kubelet: Kubelet
) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url, run_resume_max_attempts=1)) as rt:
        ctl = Controller(rt)
        t = await tenant(rt)
        run = await new_run(rt, t)
        await ctl.reconcile_once()
        name = trainer_name(run)
        dep = cluster.get(DEPLOYMENTS, name)
        assert dep is not None and dep["metadata"]["labels"]["openloops.dev/org"]
        assert await status(rt, Run, run.id) == "DEPLOYING"
        assert await status(rt, Deployment, run.deployment_id) == "DEPLOYING"

        pod = kubelet.create_pod(name)
        kubelet.set_status(pod, running("trainer", ready=False, started=True))

        async def is_(want: str) -> bool:
            await ctl.reconcile_once()
            return await status(rt, Run, run.id) == want

        await eventually(lambda: is_("LOADING_MODEL"), T, what="LOADING_MODEL")
        await trainer_reports(rt, run, q.WorkerState.READY)  # the worker loaded the model, took the run
        await eventually(lambda: is_("ACTIVE"), T, what="ACTIVE")

        # the trainer crashes: the controller replaces its Deployment and the run resumes on the
        # new pod (WAKING_UP, with the crash in the reason, then ACTIVE once the worker is READY)
        crash = waiting("trainer", "CrashLoopBackOff", restarts=1, last=terminated(137, "OOMKilled"))
        kubelet.set_status(pod, crash)
        await eventually(lambda: is_("WAKING_UP"), T, what="WAKING_UP")
        dep_hist = await history(rt, run.deployment_id)
        assert dep_hist[-1][1] == "WAKING_UP" and dep_hist[-1][2].startswith(
            "OOMKilled (exit code 137), CrashLoopBackOff; restarting the trainer to resume run"
        ), dep_hist[-1]
        assert not await rt.redis.exists(q.worker_state_key(run.deployment_id))  # the dead one's READY is gone

        async def recreated() -> bool:
            await ctl.reconcile_once()
            return cluster.get(DEPLOYMENTS, name) is not None and not cluster.objects(PODS)

        await eventually(recreated, T, what="a new trainer Deployment")
        pod = kubelet.create_pod(name, suffix="fghij")
        kubelet.set_status(pod, running("trainer", ready=True, started=True))
        await ctl.reconcile_once()
        assert await status(rt, Run, run.id) == "WAKING_UP"  # not before the new worker says READY
        await trainer_reports(rt, run, q.WorkerState.READY)
        await eventually(lambda: is_("ACTIVE"), T, what="ACTIVE again")

        # crashing again at the same op, beyond run_resume_max_attempts (1 here): FAILED
        kubelet.set_status(pod, crash)
        await eventually(lambda: is_("FAILED"), T, what="FAILED")
        went = ["DEPLOYING", "LOADING_MODEL", "ACTIVE", "WAKING_UP", "ACTIVE", "FAILED"]  # run and deployment
        hist = await history(rt, run.id)
        assert collapse([h[1] for h in hist]) == went, hist
        reason = (
            "the trainer died 2 times in a row at seq 0 without getting further, so run "
            f"{run.id} is not resumed again; last: OOMKilled (exit code 137), CrashLoopBackOff"
        )
        assert hist[-1][2] == f"deployment {run.deployment_id} failed: {reason}"
        dep_hist = await history(rt, run.deployment_id)
        assert collapse([h[1] for h in dep_hist]) == went, dep_hist
        assert dep_hist[-1][2] == reason

        # a failed run's workload is garbage-collected (its pods go with it)
        async def collected() -> bool:
            await ctl.reconcile_once()
            return cluster.get(DEPLOYMENTS, name) is None

        await eventually(collected, T, what="GC")
        assert cluster.objects(PODS) == {}


def write_outage(cluster: Cluster) -> dict[str, bool]:
    """Until ``outage["on"]`` is False the API server fails creating Deployments with 503 (it
    stores the object anyway, as when a write commits but its response is lost, so a retry
    gets 409) and reading one by name with 503: ``ensure`` keeps failing transiently. The
    watches (LIST/WATCH) are not affected, so observing works."""
    outage = {"on": True}

    def install() -> None:
        cluster.emu["post", DEPLOYMENTS][lambda _: outage["on"]] << 503
        cluster.emu["get", DEPLOYMENTS][lambda r: outage["on"] and bool(r.name)] << 503

    cluster.on_loop(install)
    return outage


async def test_transient_api_errors_are_retried_on_later_passes(services, data_dir: Path, cluster: Cluster) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url, backend_retry_attempts=5)) as rt:
        ctl = Controller(rt)
        run = await new_run(rt, await tenant(rt))
        outage = write_outage(cluster)
        key = ("deployment", run.deployment_id)
        for attempt in (1, 2):  # two whole passes fail (the backend itself tries 4 times per call)
            await eventually(lambda: ctl.retry.due(key), T, what="backoff to expire")
            await ctl.reconcile_once()
            assert await status(rt, Run, run.id) == "DEPLOYING"
            assert ctl.retry.attempts_of(key) == attempt
        skipped = cluster.count("POST", DEPLOYMENTS)
        await ctl.reconcile_once()  # still backing off: no API call for this deployment
        assert cluster.count("POST", DEPLOYMENTS) == skipped or ctl.retry.attempts_of(key) == 3
        outage["on"] = False

        async def settled() -> bool:
            await ctl.reconcile_once()
            return ctl.retry.attempts_of(key) == 0

        await eventually(settled, T, what="a successful ensure once the API recovered")
        assert list(cluster.objects(DEPLOYMENTS)) == [trainer_name(run)]
        assert await status(rt, Run, run.id) == "DEPLOYING"
        assert "DEPLOY_FAILED" not in [h[1] for h in await history(rt, run.deployment_id)]


async def test_unreachable_api_server_then_recovery(services, data_dir: Path, cluster: Cluster) -> None:
    proxy = FlakyProxy(cluster.url)
    proxy.set_down(True)
    settings = k8s_settings(services, data_dir, proxy.url, kube={"api_timeout_seconds": 1})
    try:
        async with k8s_runtime(settings) as rt:
            ctl = Controller(rt)
            run = await new_run(rt, await tenant(rt))
            for _ in range(3):
                await ctl.reconcile_once()
                assert await status(rt, Run, run.id) == "DEPLOYING"  # waiting, not failed
            assert cluster.objects(DEPLOYMENTS) == {}
            proxy.set_down(False)

            async def created() -> bool:
                await ctl.reconcile_once()
                return cluster.get(DEPLOYMENTS, trainer_name(run)) is not None

            await eventually(created, T, what="the trainer Deployment once the API server is back")
            assert "DEPLOY_FAILED" not in [h[1] for h in await history(rt, run.deployment_id)]
    finally:
        proxy.close()


async def test_transient_errors_beyond_the_budget_fail_the_run(services, data_dir: Path, cluster: Cluster) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url, backend_retry_attempts=3)) as rt:
        ctl = Controller(rt)
        run = await new_run(rt, await tenant(rt))
        write_outage(cluster)

        async def failed() -> bool:
            await ctl.reconcile_once()
            return await status(rt, Deployment, run.deployment_id) == "DEPLOY_FAILED"

        await eventually(failed, T, what="DEPLOY_FAILED after the retry budget")
        # 3 controller attempts, each: POST (503 or 409) then 4 GETs by name (503)
        gets = [r for r in cluster.requests() if r.resource == DEPLOYMENTS and r.method.value == "GET" and r.name]
        assert len(gets) == 3 * 4
        (_, to, reason) = (await history(rt, run.deployment_id))[-1]
        assert to == "DEPLOY_FAILED"
        assert reason.startswith("could not start the trainer: gave up after 3 attempts") and "503" in reason
        await ctl.reconcile_once()  # the run follows its deployment
        assert await status(rt, Run, run.id) == "FAILED"
        assert (await history(rt, run.id))[-1][2] == f"deployment {run.deployment_id} failed: {reason}"
        # the Deployment that did land is garbage-collected with the failed deployment
        await eventually(lambda: cluster.get(DEPLOYMENTS, trainer_name(run)) is None, T, what="GC")


async def test_permanent_errors_fail_at_once(services, data_dir: Path, cluster: Cluster) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        ctl = Controller(rt)
        run = await new_run(rt, await tenant(rt))
        cluster.on_loop(lambda: cluster.emu["post", DEPLOYMENTS] << 403)
        await ctl.reconcile_once()
        assert await status(rt, Deployment, run.deployment_id) == "DEPLOY_FAILED"
        assert await status(rt, Run, run.id) == "FAILED"
        assert cluster.count("POST", DEPLOYMENTS) == 1
        reason = (await history(rt, run.deployment_id))[-1][2]
        assert reason.startswith("could not start the trainer:") and "forbidden (403)" in reason


async def test_controller_restarted_mid_way_creates_no_duplicates_and_leaks_nothing(
    services, data_dir: Path, cluster: Cluster, kubelet: Kubelet
) -> None:
    settings = k8s_settings(services, data_dir, cluster.url)
    before = {t.name for t in threading.enumerate()}
    async with k8s_runtime(settings) as rt:
        t = await tenant(rt)
        sm = await new_served_model(rt, t)
        run = await new_run(rt, t)
        async with rt.db.session() as s:
            ckpt_run = (await s.execute(select(Run).where(Run.id != run.id))).scalar_one()
        # the first controller creates the Deployments but "dies" before the Service exists
        outage = write_outage(cluster)  # ensure fails after the Deployment landed: no Service yet
        await Controller(rt).reconcile_once()
        outage["on"] = False
        name = workload_name(sm.id, WorkloadRole.SERVED_MODEL)
        expected = {name, trainer_name(run), trainer_name(ckpt_run)}
        assert set(cluster.objects(DEPLOYMENTS)) == expected
        assert cluster.objects(SERVICES) == {}
        assert await status(rt, ServedModel, sm.id) == "DEPLOYING"
    # a new process: fresh backend (empty caches), same database and cluster
    async with k8s_runtime(settings) as rt:
        ctl = Controller(rt)
        await ctl.reconcile_once()
        assert set(cluster.objects(DEPLOYMENTS)) == expected  # no duplicates
        assert set(cluster.objects(SERVICES)) == {name}  # the half-made workload was completed
        pod = kubelet.create_pod(name)
        kubelet.set_status(pod, running("served-model", ready=True, started=True))

        async def active() -> bool:
            await ctl.reconcile_once()
            return await status(rt, ServedModel, sm.id) == "ACTIVE"

        await eventually(active, T, what="served model ACTIVE")
        # deactivation removes everything; nothing is left in the cluster afterwards
        async with rt.db.transaction() as s:
            from control_plane.services.history import request_deactivation
            from control_plane.services.runs import end_run

            request_deactivation(s, "served_model", await s.get(ServedModel, sm.id), "test")
            for rid in (run.id, ckpt_run.id):
                await end_run(s, await s.get(Run, rid), "test")

        async def all_gone() -> bool:
            await ctl.reconcile_once()
            got = {
                await status(rt, ServedModel, sm.id),
                await status(rt, Run, run.id),
                await status(rt, Run, ckpt_run.id),
                await status(rt, Deployment, run.deployment_id),
                await status(rt, Deployment, ckpt_run.deployment_id),
            }
            return got == {"INACTIVE"}

        await eventually(all_gone, T, what="both INACTIVE")
    assert cluster.objects(DEPLOYMENTS) == {} and cluster.objects(SERVICES) == {} and cluster.objects(PODS) == {}
    # every Deployment was created once (the first controller); the second only got 409s
    posts = [r for r in cluster.requests() if r.method.value.upper() == "POST" and r.resource == DEPLOYMENTS]
    assert {r.data["metadata"]["name"] for r in posts} == expected
    leaked = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not [n for n in leaked if n.startswith("openloops-k8s")], leaked


@pytest.mark.parametrize("next_seq", [0, 5])
async def test_a_vanished_trainer_is_recreated_and_its_run_resumes(
    services, data_dir: Path, cluster: Cluster, kubelet: Kubelet, next_seq: int
) -> None:
    """Whether or not its run executed ops: the new worker restores the run's snapshot."""
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        ctl = Controller(rt)
        run = await new_run(rt, await tenant(rt))
        await ctl.reconcile_once()
        name = trainer_name(run)
        kubelet.set_status(kubelet.create_pod(name), running("trainer", ready=True, started=True))
        await trainer_reports(rt, run, q.WorkerState.READY)
        await rt.redis.hset(q.run_state_key(run.id), "next_seq", str(next_seq))

        async def is_(want: str) -> bool:
            await ctl.reconcile_once()
            return await status(rt, Deployment, run.deployment_id) == want

        await eventually(lambda: is_("ACTIVE"), T, what="ACTIVE")
        uid = cluster.get(DEPLOYMENTS, name)["metadata"]["uid"]
        cluster.apps.delete_namespaced_deployment(name, NAMESPACE)  # someone deletes it
        await eventually(lambda: is_("WAKING_UP"), T, what="WAKING_UP")
        hist = await history(rt, run.deployment_id)
        after = hist[[h[1] for h in hist].index("ACTIVE") + 1 :]
        (_, to, reason) = after[0]
        assert to == "WAKING_UP"
        assert reason == (
            f"the trainer workload disappeared; restarting the trainer to resume run {run.id} from its "
            "snapshot and op log (attempt 1 of 3)"
        )

        async def recreated() -> bool:
            await ctl.reconcile_once()
            again = cluster.get(DEPLOYMENTS, name)
            return again is not None and again["metadata"]["uid"] != uid

        await eventually(recreated, T, what="a new Deployment")
        assert await status(rt, Run, run.id) == "WAKING_UP"
