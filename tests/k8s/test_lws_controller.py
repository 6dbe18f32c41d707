"""The controller with the Kubernetes backend against kmock (real Postgres and Redis) for a base
model whose catalog trainer spans two nodes: the run's deployment gets a LeaderWorkerSet (no
Deployment), goes ACTIVE once every pod of the group is ready and the worker reports READY, fails
over when a worker pod crash-loops, and the run's end removes the set and its pods."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.catalog import ModelCatalog
from control_plane.controller.reconciler import Controller
from control_plane.db.models import Deployment, Run
from control_plane.scheduler.k8s_manifests import workload_name
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.services.runs import end_run
from data_plane.wire import queue as q
from tests.control_plane.conftest import TEST_MODEL
from tests.k8s.conftest import DEPLOYMENTS, LEADERWORKERSETS, PODS, Cluster, eventually, running, terminated, waiting
from tests.k8s.controller_env import history, k8s_runtime, k8s_settings, new_run, status, tenant, trainer_reports
from tests.k8s.lws_cluster import LwsKubelet, group_pods
from tests.k8s.lws_schema import validate_leader_worker_set

pytestmark = pytest.mark.usefixtures("clean_state")
T = 30.0


async def test_a_run_on_a_two_node_trainer_gets_a_leader_worker_set(services, data_dir: Path, cluster: Cluster) -> None:
    settings = k8s_settings(services, data_dir, cluster.url)
    catalog = ModelCatalog.load(settings.model_catalog_path)
    trainer = catalog.get(TEST_MODEL).resources.trainer
    trainer.nodes, trainer.gpus = 2, 4
    catalog.dump(settings.model_catalog_path)

    async with k8s_runtime(settings) as rt:
        ctl = Controller(rt)
        run = await new_run(rt, await tenant(rt))
        assert run.deployment_id is not None
        await ctl.reconcile_once()
        name = workload_name(run.deployment_id, WorkloadRole.TRAINER)
        assert cluster.objects(DEPLOYMENTS) == {}
        lws = cluster.get(LEADERWORKERSETS, name)
        assert lws is not None
        validate_leader_worker_set(lws)
        lwt = lws["spec"]["leaderWorkerTemplate"]
        assert (lws["spec"]["replicas"], lwt["size"], lwt["restartPolicy"]) == (1, 2, "RecreateGroupOnPodRestart")
        (c,) = lwt["leaderTemplate"]["spec"]["containers"]
        assert c["command"][:5] == ["python", "-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=2"]
        assert "--node-rank=$(LWS_WORKER_INDEX)" in c["command"]
        assert "--master-addr=$(LWS_LEADER_ADDRESS)" in c["command"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert await status(rt, Run, run.id) == "DEPLOYING"

        async def is_(want: str) -> bool:
            await ctl.reconcile_once()
            return await status(rt, Run, run.id) == want

        kubelet = LwsKubelet(cluster)
        leader, worker = kubelet.create_group(name)
        kubelet.set_status(leader, running("trainer", ready=True, started=True))
        kubelet.set_status(worker, running("trainer", ready=False, started=True))
        await eventually(lambda: is_("LOADING_MODEL"), T, what="LOADING_MODEL")
        kubelet.set_status(worker, running("trainer", ready=True, started=True))
        await trainer_reports(rt, run, q.WorkerState.READY)  # rank 0 loaded the model and took the run
        await eventually(lambda: is_("ACTIVE"), T, what="ACTIVE")

        # a worker pod crash-loops: the group's failure (named) restarts the trainer, and the
        # run resumes on the new group
        kubelet.set_status(worker, waiting("trainer", "CrashLoopBackOff", restarts=1, last=terminated(1, "Error")))
        await eventually(lambda: is_("WAKING_UP"), T, what="WAKING_UP")
        dep_hist = await history(rt, run.deployment_id)
        assert dep_hist[-1][2].startswith("worker 1: CrashLoopBackOff (last exit code 1: Error)"), dep_hist[-1]

        async def recreated() -> bool:
            await ctl.reconcile_once()
            return cluster.get(LEADERWORKERSETS, name) is not None and not cluster.objects(PODS)

        await eventually(recreated, T, what="a new LeaderWorkerSet")
        assert cluster.objects(DEPLOYMENTS) == {}
        kubelet.create_group(name, status=running("trainer", ready=True, started=True))
        await trainer_reports(rt, run, q.WorkerState.READY)
        await eventually(lambda: is_("ACTIVE"), T, what="ACTIVE again")

        # the run ends: its deployment's LeaderWorkerSet and the group's pods go
        async with rt.db.transaction() as s:
            await end_run(s, await s.get(Run, run.id), "test")

        async def gone() -> bool:
            await ctl.reconcile_once()
            return await status(rt, Deployment, run.deployment_id) == "INACTIVE"

        await eventually(gone, T, what="the deployment INACTIVE")
        assert cluster.objects(LEADERWORKERSETS) == {}
        assert group_pods(cluster, name) == {} and cluster.objects(PODS) == {}
        assert await rt.backend.list_workloads() == []
