"""The trainer workload the controller hands to a backend: how many ranks under torchrun, how
replicas and nodes shape it per backend, and the allocator it preloads."""

from __future__ import annotations

import ctypes.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from control_plane.catalog import CatalogModel, CatalogResources, RoleResources
from control_plane.controller.allocator import JEMALLOC_CONF
from control_plane.controller.workloads import TORCHRUN_PORT, trainer_spec
from control_plane.errors import InvalidInput
from control_plane.runtime import build_runtime
from control_plane.settings import BackendKind
from data_plane.wire.worker_config import TrainerLaunch
from tests.control_plane.conftest import TEST_MODEL, make_settings

REPO = Path(__file__).resolve().parents[2]
SINGLE = ["python", "-m", "data_plane.trainer"]


def deployment(base_model: str = TEST_MODEL, replicas: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        id="dep-1",
        org_id="org-1",
        base_model=base_model,
        max_seq_len=512,
        replicas=replicas,
        availability_model="dedicated",
    )


def gpu_model(gpus: int, nodes: int = 1) -> CatalogModel:
    return CatalogModel(
        name=f"big/{gpus}x{nodes}",
        source="/models/big",
        resources=CatalogResources(trainer=RoleResources(gpus=gpus, nodes=nodes, gpu_type="H100")),
    )


async def test_local_trainers_run_their_ranks_and_replicas_under_one_torchrun(services, data_dir) -> None:
    rt = build_runtime(make_settings(services, data_dir, trainer_ranks=2), with_backend=False)
    try:
        one = build_runtime(make_settings(services, data_dir), with_backend=False)
        try:
            assert trainer_spec(one, deployment()).command == SINGLE  # the default: one process  # type: ignore[arg-type]
        finally:
            await one.close()
        spec = trainer_spec(rt, deployment(replicas=3))  # type: ignore[arg-type]
        assert spec.command == [
            "python",
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=6",  # 2 ranks per replica, 3 replicas
            "--nnodes=1",
            "--standalone",
            "--max-restarts=0",
            "-m",
            "data_plane.trainer",
        ]
        assert spec.nodes == 1
        assert TrainerLaunch.from_env(spec.env).replicas == 3
        rt.catalog.upsert(gpu_model(8, nodes=2))
        with pytest.raises(InvalidInput, match="needs 2 trainer nodes; local mode runs single-node"):
            trainer_spec(rt, deployment("big/8x2"))  # type: ignore[arg-type]
    finally:
        await rt.close()


async def test_kubernetes_trainers_get_a_rank_per_gpu_and_a_pod_per_replica_node(services, data_dir) -> None:
    rt = build_runtime(make_settings(services, data_dir, backend=BackendKind.KUBERNETES), with_backend=False)
    try:
        rt.catalog.upsert(gpu_model(4))
        rt.catalog.upsert(gpu_model(8, nodes=2))
        spec = trainer_spec(rt, deployment("big/4x1"))  # type: ignore[arg-type]
        assert spec.nodes == 1 and spec.resources.gpus == 4
        assert spec.command[3:7] == ["--nproc-per-node=4", "--nnodes=1", "--standalone", "--max-restarts=0"]
        # two nodes of 8 GPUs, two replicas: one group of four pods meeting at the leader
        spec = trainer_spec(rt, deployment("big/8x2", replicas=2))  # type: ignore[arg-type]
        assert spec.nodes == 4 and spec.resources.gpus == 8
        assert spec.command[3:] == [
            "--nproc-per-node=8",
            "--nnodes=4",
            "--node-rank=$(LWS_WORKER_INDEX)",
            "--master-addr=$(LWS_LEADER_ADDRESS)",
            f"--master-port={TORCHRUN_PORT}",
            "--max-restarts=0",
            "-m",
            "data_plane.trainer",
        ]
        assert TrainerLaunch.from_env({**spec.env, "OPENLOOPS_REDIS_URL": "redis://r"}).replicas == 2
        # the trainer image has jemalloc: always preloaded there
        assert spec.env["LD_PRELOAD"] == "libjemalloc.so.2" and spec.env["MALLOC_CONF"] == JEMALLOC_CONF
    finally:
        await rt.close()


async def test_the_allocator_setting(services, data_dir) -> None:
    rt = build_runtime(make_settings(services, data_dir), with_backend=False)
    system = build_runtime(make_settings(services, data_dir, trainer_allocator="system"), with_backend=False)
    try:
        env = trainer_spec(rt, deployment()).env  # type: ignore[arg-type]
        found = ctypes.util.find_library("jemalloc")
        if found is None:  # local mode without the library: the system allocator (scripts/install adds it)
            assert "LD_PRELOAD" not in env
        else:
            assert env["LD_PRELOAD"] == found and env["MALLOC_CONF"] == JEMALLOC_CONF
        assert "LD_PRELOAD" not in trainer_spec(system, deployment()).env  # type: ignore[arg-type]
    finally:
        await rt.close()
        await system.close()


async def test_the_gpu_example_values_give_sharded_trainers(services, data_dir) -> None:
    """helm/examples/values-gpu.yaml as written: the 70B model's trainer is one pod of 4 GPUs
    running 4 ranks (the base sharded across them), with shared memory for NCCL; as a Loops run
    with replicas 2 it becomes a valid LeaderWorkerSet of two such pods."""
    import kubernetes_validate
    import yaml

    from control_plane.scheduler.k8s_manifests import workload_object_manifest
    from control_plane.scheduler.kubernetes_settings import KubernetesSettings
    from tests.k8s.lws_schema import K8S_VERSION, validate_leader_worker_set

    values = yaml.safe_load((REPO / "helm" / "examples" / "values-gpu.yaml").read_text())
    rt = build_runtime(make_settings(services, data_dir, backend=BackendKind.KUBERNETES), with_backend=False)
    k8s = KubernetesSettings(namespace="openloops-workloads", worker_secret_name="openloops-worker-credentials")
    try:
        for entry in values["modelCatalog"]["models"]:
            rt.catalog.upsert(CatalogModel(**entry))
        name = "meta-llama/Llama-3.1-70B-Instruct"
        spec = trainer_spec(rt, deployment(name))  # type: ignore[arg-type]
        assert spec.nodes == 1 and spec.resources.gpus == 4 and spec.resources.shm == "16Gi"
        assert "--nproc-per-node=4" in spec.command and "--standalone" in spec.command
        doc = workload_object_manifest(spec, k8s)
        assert doc["kind"] == "Deployment"
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] in (4, "4")
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        two = trainer_spec(rt, deployment(name, replicas=2))  # type: ignore[arg-type]
        doc = workload_object_manifest(two, k8s)
        assert doc["kind"] == "LeaderWorkerSet" and doc["spec"]["leaderWorkerTemplate"]["size"] == 2
        validate_leader_worker_set(doc)
    finally:
        await rt.close()
