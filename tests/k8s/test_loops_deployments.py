"""Loops deployments on Kubernetes (kmock, real Postgres and Redis, the real controller and API):
a run's deployment is one trainer Deployment; a run that reuses it takes it over without a new
one (the worker is told through an attach event); its logs and metrics come from its pods;
deactivating it removes the workload and its runs end."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from control_plane.api.app import create_app
from control_plane.controller.reconciler import Controller
from control_plane.db.models import Deployment, Run
from control_plane.scheduler.k8s_manifests import workload_name
from control_plane.scheduler.protocol import WorkloadRole
from data_plane.wire import queue as q
from tests.k8s.conftest import DEPLOYMENTS, NAMESPACE, PODS, Cluster, Kubelet, eventually, running
from tests.k8s.controller_env import k8s_runtime, k8s_settings, new_run, status, tenant, trainer_reports
from tests.k8s.test_backend_logs_usage import PodLogs, pod_logs, put_metrics, worker_line  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("clean_state")
T = 30.0
S = 1_000_000_000


async def test_deployment_reuse_logs_metrics_and_deactivation_on_kubernetes(
    services,
    data_dir: Path,
    cluster: Cluster,
    kubelet: Kubelet,
    pod_logs: PodLogs,
) -> None:
    settings = k8s_settings(
        services, data_dir, cluster.url, usage_sample_seconds=0.01, public_base_url="http://testserver"
    )
    async with k8s_runtime(settings) as rt:
        ctl = Controller(rt)
        t = await tenant(rt)
        first = await new_run(rt, t)
        dep_id = first.deployment_id
        assert dep_id is not None
        await ctl.reconcile_once()
        name = workload_name(dep_id, WorkloadRole.TRAINER)
        assert list(cluster.objects(DEPLOYMENTS)) == [name]
        pod = kubelet.create_pod(name, "t1a2b")
        kubelet.set_status(pod, running("trainer", ready=True, started=True))
        cluster.core.patch_namespaced_pod(pod, NAMESPACE, {"spec": {"nodeName": "gpu-node-1"}})
        await trainer_reports(rt, first, q.WorkerState.READY)

        async def is_(model, rid: str, want: str) -> bool:
            await ctl.reconcile_once()
            return await status(rt, model, rid) == want

        await eventually(lambda: is_(Run, first.id, "ACTIVE"), T, what="first run ACTIVE")
        attached = await rt.redis.xrevrange(q.deployment_runs_stream(dep_id), count=1)
        assert attached[0][1][b"run_id"].decode() == first.id  # the controller told the worker

        second = await new_run(rt, t, reuse_from_run_id=first.id)
        assert second.deployment_id == dep_id
        await ctl.reconcile_once()
        assert list(cluster.objects(DEPLOYMENTS)) == [name]  # no second trainer: the warm one
        attached = await rt.redis.xrevrange(q.deployment_runs_stream(dep_id), count=1)
        assert attached[0][1][b"run_id"].decode() == second.id
        assert await status(rt, Run, first.id) == "INACTIVE"
        await trainer_reports(rt, second, q.WorkerState.READY)
        await eventually(lambda: is_(Run, second.id, "ACTIVE"), T, what="second run ACTIVE")

        # its logs are its pods' logs; its metrics include what metrics-server says of them
        now = time.time_ns()
        pod_logs.add(
            pod,
            "trainer",
            [
                (now - 2 * S, worker_line(now - 2 * S, "INFO", f"attached run {second.id}")),
                (now - S, worker_line(now - S, "ERROR", "seq 3 optim_step failed (request req-9): boom")),
            ],
        )
        put_metrics(cluster, pod, {"trainer": {"cpu": "1500m", "memory": "2Gi"}})
        await ctl.reconcile_once()  # samples usage
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(rt)), base_url="http://testserver", headers=t.headers
        ) as c:
            logs = (await c.get(f"/v1/loops/deployments/{dep_id}/logs")).json()["logs"]
            assert [(x["level"], x["replica"], x["request_id"]) for x in logs] == [
                ("ERROR", pod, "req-9"),
                ("INFO", pod, None),
            ]
            assert logs[1]["message"].endswith(f"attached run {second.id}") and int(logs[0]["timestamp"]) == now - S
            metrics = (await c.post(f"/v1/loops/deployments/{dep_id}/metrics", json={})).json()["metrics"]
            assert (
                metrics["cpu_usage"][-1]["value"] == 1.5 and metrics["cpu_memory_usage_bytes"][-1]["value"] == 2 * 2**30
            )
            assert [n["node_id"] for n in metrics["per_node_metrics"]] == ["gpu-node-1"]
            dep = (await c.get(f"/v1/loops/deployments/{dep_id}")).json()["deployment"]
            assert (dep["status"]["name"], dep["active_run_id"]) == ("RUNNING", second.id)

            r = await c.post(f"/v1/loops/deployments/{dep_id}/deactivate")
            assert r.status_code == 200
        await eventually(lambda: is_(Deployment, dep_id, "INACTIVE"), T, what="deployment INACTIVE")
        await eventually(lambda: is_(Run, second.id, "INACTIVE"), T, what="its run INACTIVE")
        assert cluster.objects(DEPLOYMENTS) == {} and cluster.objects(PODS) == {}
