"""Multi-node workloads (``WorkloadSpec.nodes > 1``) as LeaderWorkerSets: KubernetesBackend over
HTTP against kmock's emulator with the real client; ``LwsKubelet`` / ``GroupPlayer`` play the
LWS controller and the kubelet. Every rendered LeaderWorkerSet is validated against the vendored
v1 CRD schema and its pod templates against Kubernetes' PodTemplateSpec (tests/k8s/lws_schema.py)."""

from __future__ import annotations

import re

import jsonschema
import pytest

from control_plane.controller.workloads import trainer_command
from control_plane.scheduler.k8s_errors import KubernetesApiError
from control_plane.scheduler.k8s_manifests import (
    LABEL_LWS_WORKER_INDEX,
    LABEL_MANAGED_BY,
    LABEL_WORKLOAD,
    leader_worker_set_manifest,
    workload_manifests,
    workload_name,
)
from control_plane.scheduler.kubernetes import KubernetesBackend
from control_plane.scheduler.protocol import LogQuery, Phase, Resources, WorkloadRole
from tests.k8s.conftest import (
    DEPLOYMENTS,
    LEADERWORKERSETS,
    NAMESPACE,
    PODS,
    SERVICES,
    WORKER_SECRET,
    Cluster,
    Kubelet,
    backend_settings,
    eventually,
    running,
    sampler_spec,
    terminated,
    trainer_spec,
    unschedulable,
    wait_phase,
    waiting,
)
from tests.k8s.lws_cluster import GroupPlayer, LwsKubelet, group_pods
from tests.k8s.lws_schema import validate_leader_worker_set
from tests.k8s.test_backend_logs_usage import PodLogs, put_metrics

GPU8 = Resources(gpus=8, gpu_type="NVIDIA-H100-80GB-HBM3", cpu="64", memory="512Gi")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def group_trainer(**kw):
    return trainer_spec(nodes=2, command=trainer_command(8, 2), resources=GPU8, **kw)


def group_sampler(**kw):
    return sampler_spec(nodes=2, **kw)


async def test_a_multi_node_trainer_is_one_leader_worker_set(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = group_trainer()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    assert cluster.objects(DEPLOYMENTS) == {} and cluster.objects(SERVICES) == {}
    lws = cluster.get(LEADERWORKERSETS, name)
    assert lws is not None
    validate_leader_worker_set(lws)  # as the API server stored it

    assert lws["metadata"]["labels"][LABEL_MANAGED_BY] == "openloops"
    assert lws["spec"]["replicas"] == 1
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    # a trainer serves nothing: leader and workers run the very same pod
    assert lwt["leaderTemplate"] == lwt["workerTemplate"]
    tmpl = lwt["leaderTemplate"]
    assert tmpl["metadata"]["labels"] == lws["metadata"]["labels"]
    pod = tmpl["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/openloops/trainer:0.1.0"
    assert c["command"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=8",
        "--nnodes=2",
        "--node-rank=$(LWS_WORKER_INDEX)",
        "--master-addr=$(LWS_LEADER_ADDRESS)",
        "--master-port=29500",
        "--max-restarts=0",
        "-m",
        "data_plane.trainer",
    ]
    # GPUs are per pod: each node of the group asks for its own 8
    assert c["resources"] == {
        "requests": {"cpu": "64", "memory": "512Gi"},
        "limits": {"memory": "512Gi", "nvidia.com/gpu": "8"},
    }
    env = {e["name"]: e for e in c["env"]}
    assert env["OPENLOOPS_WORKER_CONFIG"]["value"] == '{"run_id": "run:Trainer-7"}'
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[secret] == {"name": secret, "valueFrom": {"secretKeyRef": {"name": WORKER_SECRET, "key": secret}}}
    assert pod["nodeSelector"] == {"openloops.dev/pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["serviceAccountName"] == "openloops-worker" and pod["automountServiceAccountToken"] is False
    assert not {"ports", "startupProbe", "readinessProbe", "livenessProbe"} & set(c)

    # every $(VAR) of the command is one the LWS controller sets in each pod of the group
    for pod_name, obj in _created_group(cluster, name).items():
        container = obj["spec"]["containers"][0]
        defined = {e["name"] for e in container["env"]}
        refs = {m for arg in container["command"] for m in VAR_REF.findall(arg)}
        assert refs == {"LWS_WORKER_INDEX", "LWS_LEADER_ADDRESS"} and refs <= defined, pod_name


async def _scaled_down_clean(backend: KubernetesBackend, spec) -> bool:
    obs = await backend.observe(spec.workload_id, spec.role)
    assert obs.phase == Phase.SCALED_DOWN
    return obs.reason is None


def _created_group(cluster: Cluster, name: str) -> dict:
    LwsKubelet(cluster).create_group(name)
    pods = group_pods(cluster, name)
    assert sorted(pods) == [f"{name}-0", f"{name}-0-1"]
    return pods


async def test_a_multi_node_sampler_serves_from_its_leader(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = group_sampler()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    lws, svc = cluster.get(LEADERWORKERSETS, name), cluster.get(SERVICES, name)
    assert lws is not None and svc is not None
    validate_leader_worker_set(lws)
    lwt = lws["spec"]["leaderWorkerTemplate"]
    (leader,) = lwt["leaderTemplate"]["spec"]["containers"]
    (worker,) = lwt["workerTemplate"]["spec"]["containers"]
    assert leader["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert leader["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert not {"ports", "startupProbe", "readinessProbe", "livenessProbe"} & set(worker)
    assert worker["command"] == leader["command"] and worker["env"] == leader["env"]
    # the Service selects the leader pod only, and goes with the LeaderWorkerSet
    assert svc["spec"]["selector"] == {LABEL_WORKLOAD: name, LABEL_LWS_WORKER_INDEX: "0"}
    assert svc["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "leaderworkerset.x-k8s.io/v1",
            "kind": "LeaderWorkerSet",
            "name": name,
            "uid": lws["metadata"]["uid"],
            "controller": True,
        }
    ]
    leader_pod, _worker = LwsKubelet(cluster).create_group(name)
    labels = {p: o["metadata"]["labels"] for p, o in group_pods(cluster, name).items()}
    selected = [p for p, lab in labels.items() if svc["spec"]["selector"].items() <= lab.items()]
    assert selected == [leader_pod]


async def test_group_status_from_all_of_its_pods(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = group_sampler()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    obs = await wait_phase(backend, spec, phase=Phase.PENDING)
    assert obs.reason == "waiting for group pods to be created (0 of 2)"

    kubelet = LwsKubelet(cluster)
    leader, worker = kubelet.create_group(name)
    kubelet.set_status(leader, running("sampler", ready=True, started=True))
    kubelet.set_status(worker, waiting("sampler", "ContainerCreating"))
    # the leader alone is not the group
    obs = await wait_phase(backend, spec, phase=Phase.PENDING, reason="worker 1: ContainerCreating")
    kubelet.set_status(worker, running("sampler", ready=False, started=False))
    await wait_phase(backend, spec, phase=Phase.STARTING, reason="worker 1: running, not ready (loading)")
    kubelet.set_status(worker, running("sampler", ready=True, started=True))
    obs = await wait_phase(backend, spec, phase=Phase.READY)
    assert obs.endpoint == f"http://{name}.{NAMESPACE}.svc.cluster.local:8000"

    # one crash-looping worker fails the group, named
    crash = waiting("sampler", "CrashLoopBackOff", restarts=2, last=terminated(1, "Error"))
    kubelet.set_status(worker, crash)
    obs = await wait_phase(backend, spec, phase=Phase.FAILED)
    assert obs.reason == "worker 1: CrashLoopBackOff (last exit code 1: Error)" and obs.exit_code == 1

    # an unschedulable worker: pending within the grace, failed after it
    kubelet.set_status(worker, unschedulable(ago=10))
    obs = await wait_phase(backend, spec, phase=Phase.PENDING)
    assert obs.reason == "worker 1: Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    kubelet.set_status(worker, unschedulable(ago=3600))
    obs = await wait_phase(backend, spec, phase=Phase.FAILED)
    assert obs.reason == "worker 1: Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."

    # an OOM-killed leader
    kubelet.set_status(worker, running("sampler", ready=True, started=True))
    kubelet.set_status(
        leader,
        waiting("sampler", "CrashLoopBackOff", restarts=1, last=terminated(137, "OOMKilled")),
    )
    # (FAILED already, for the worker: wait for the leader's reason, not just the phase)
    obs = await wait_phase(
        backend, spec, phase=Phase.FAILED, reason="leader: OOMKilled (exit code 137), CrashLoopBackOff"
    )
    assert obs.exit_code == 137

    details = (await backend.describe(spec.workload_id, spec.role)).details
    assert details["leaderworkerset"] == name and details["deployment"] is None
    assert details["group_size"] == 2 and details["replicas"] == 1 and details["service"] == name
    assert {p["name"]: p["group_role"] for p in details["pods"]} == {leader: "leader", worker: "worker 1"}


async def test_scale_a_group_to_zero_and_back(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = group_trainer()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    with GroupPlayer(cluster):
        await wait_phase(backend, spec, phase=Phase.READY)
        assert len(group_pods(cluster, name)) == 2
        await backend.scale(spec.workload_id, spec.role, 0)
        assert cluster.get(LEADERWORKERSETS, name)["spec"]["replicas"] == 0
        assert cluster.objects(DEPLOYMENTS) == {}  # no Deployment was made for it
        obs = await wait_phase(backend, spec, phase=Phase.SCALED_DOWN)
        await eventually(lambda: group_pods(cluster, name) == {}, what="the group's pods to go")
        await eventually(lambda: _scaled_down_clean(backend, spec), what="scaled down, no pod left")
        await backend.scale(spec.workload_id, spec.role, 1)
        assert cluster.get(LEADERWORKERSETS, name)["spec"]["replicas"] == 1
        obs = await wait_phase(backend, spec, phase=Phase.READY)
        assert obs.endpoint is None  # a trainer serves nothing
    assert cluster.count("PATCH", LEADERWORKERSETS) == 2
    assert cluster.count("PATCH", DEPLOYMENTS) == 0


async def test_remove_deletes_the_group_and_list_sees_it(backend: KubernetesBackend, cluster: Cluster) -> None:
    trainer, sampler = group_trainer(), group_sampler()
    single = trainer_spec(workload_id="run:single")
    for spec in (trainer, sampler, single):
        await backend.ensure(spec)
    for spec in (trainer, sampler):
        LwsKubelet(cluster).create_group(workload_name(spec.workload_id, spec.role))
    assert len(cluster.objects(PODS)) == 4
    assert await backend.list_workloads() == sorted(
        [
            (trainer.workload_id, WorkloadRole.TRAINER),
            (sampler.workload_id, WorkloadRole.SAMPLER),
            ("run:single", WorkloadRole.TRAINER),
        ]
    )
    for _ in range(2):  # idempotent
        await backend.remove(sampler.workload_id, sampler.role)
        await backend.remove(trainer.workload_id, trainer.role)
    assert cluster.objects(LEADERWORKERSETS) == {}
    assert cluster.objects(SERVICES) == {}
    assert cluster.objects(PODS) == {}  # the groups' pods went with their sets
    assert list(cluster.objects(DEPLOYMENTS)) == [workload_name("run:single", WorkloadRole.TRAINER)]
    assert await backend.list_workloads() == [("run:single", WorkloadRole.TRAINER)]
    assert (await backend.observe(trainer.workload_id, trainer.role)).phase == Phase.ABSENT
    # a fresh backend (its caches not synced) lists both kinds directly
    cold = KubernetesBackend.from_settings(backend_settings(cluster.url))
    try:
        await cold.ensure(group_sampler(workload_id="smp:again"))
        cold._started = True  # no watches: list_workloads reads directly
        fresh = KubernetesBackend.from_settings(backend_settings(cluster.url, api_timeout_seconds=0.5))
        fresh._started = True
        try:
            assert await fresh.list_workloads() == [
                ("run:single", WorkloadRole.TRAINER),
                ("smp:again", WorkloadRole.SAMPLER),
            ]
        finally:
            await fresh.close()
    finally:
        await cold.close()


async def test_a_workload_that_becomes_multi_node_replaces_its_deployment(
    backend: KubernetesBackend, cluster: Cluster, kubelet: Kubelet
) -> None:
    single, group = sampler_spec(), group_sampler()
    name = workload_name(single.workload_id, single.role)
    await backend.ensure(single)
    kubelet.set_status(kubelet.create_pod(name), running("sampler", ready=True, started=True))
    await wait_phase(backend, single, phase=Phase.READY)

    await backend.ensure(group)  # deletes the Deployment (its pod and Service go too) ...
    assert cluster.objects(DEPLOYMENTS) == {} and cluster.objects(SERVICES) == {}
    assert cluster.objects(LEADERWORKERSETS) == {}  # ... and makes the group on a later pass
    await eventually(lambda: not cluster.objects(PODS), what="the old pod to go")
    await backend.ensure(group)
    assert list(cluster.objects(LEADERWORKERSETS)) == [name] and cluster.objects(DEPLOYMENTS) == {}
    svc = cluster.get(SERVICES, name)
    assert svc is not None and svc["spec"]["selector"][LABEL_LWS_WORKER_INDEX] == "0"
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "LeaderWorkerSet"

    # and back to one pod: the LeaderWorkerSet and its pods go before the Deployment comes
    LwsKubelet(cluster).create_group(name)
    await backend.ensure(single)
    assert cluster.objects(LEADERWORKERSETS) == {} and cluster.objects(DEPLOYMENTS) == {}
    await eventually(lambda: not cluster.objects(PODS), what="the group's pods to go")
    await backend.ensure(single)
    assert list(cluster.objects(DEPLOYMENTS)) == [name] and cluster.objects(LEADERWORKERSETS) == {}
    assert cluster.get(SERVICES, name)["metadata"]["ownerReferences"][0]["kind"] == "Deployment"


async def test_logs_and_usage_cover_every_pod_of_the_group(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = group_trainer()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    kubelet = LwsKubelet(cluster)
    pods = kubelet.create_group(name, status=running("trainer", ready=True, started=True))
    logs = PodLogs(cluster)
    for i, pod in enumerate(pods):
        logs.add(pod, "trainer", [(10**18 + i, f"rank {i} up")])
        put_metrics(cluster, pod, {"trainer": {"cpu": "1", "memory": "1Gi"}})
    lines = await backend.logs(spec.workload_id, spec.role, LogQuery(0, 2 * 10**18, 10, "asc"))
    assert [(x.replica, x.message) for x in lines] == [(pods[0], "rank 0 up"), (pods[1], "rank 1 up")]
    usage = await backend.usage(spec.workload_id, spec.role)
    assert sorted(u.replica for u in usage) == sorted(pods) and all(u.cpu_cores == 1.0 for u in usage)


async def test_without_the_lws_crd_single_pod_workloads_work_and_groups_fail_clearly() -> None:
    cluster = Cluster(lws=False).start()
    b = KubernetesBackend.from_settings(backend_settings(cluster.url))
    try:
        single = sampler_spec()
        await b.ensure(single)
        assert await b.wait_synced(5.0)  # the missing API does not keep the caches unsynced
        assert not b.groups.served
        name = workload_name(single.workload_id, single.role)
        Kubelet(cluster).create_pod(name, status=running("sampler", ready=True, started=True))
        await wait_phase(b, single, phase=Phase.READY)
        assert await b.list_workloads() == [(single.workload_id, single.role)]
        await b.scale(single.workload_id, single.role, 0)
        await b.remove(single.workload_id, single.role)
        # nothing was asked about LeaderWorkerSets but the watch's LIST
        assert cluster.count("POST", LEADERWORKERSETS) == 0
        assert cluster.count("PATCH", LEADERWORKERSETS) == 0 and cluster.count("DELETE", LEADERWORKERSETS) == 0
        with pytest.raises(KubernetesApiError, match="install the LeaderWorkerSet controller") as err:
            await b.ensure(group_sampler(workload_id="smp:group"))
        assert err.value.status == 404
    finally:
        await b.close()
        cluster.stop()


# --- the manifests offline ----------------------------------------------------------------------


def test_rendered_groups_validate_against_the_crd_and_pod_schemas() -> None:
    from tests.k8s.test_manifests import BARE, FULL, GPU

    for settings in (BARE, FULL):
        for spec in (group_trainer(), group_sampler(resources=GPU), group_trainer(replicas=0, secret_env=[])):
            docs = workload_manifests(spec, settings)
            assert docs[0]["kind"] == "LeaderWorkerSet"
            validate_leader_worker_set(docs[0])
            assert [d["kind"] for d in docs[1:]] == (["Service"] if spec.port else [])


def test_the_schema_validation_can_fail() -> None:
    from tests.k8s.test_manifests import BARE

    doc = leader_worker_set_manifest(group_trainer(), BARE)
    doc["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"  # not one of the CRD's enum
    with pytest.raises(jsonschema.ValidationError):
        validate_leader_worker_set(doc)
    doc = leader_worker_set_manifest(group_trainer(), BARE)
    doc["spec"]["leaderWorkerTemplate"]["sizee"] = 2  # unknown field
    with pytest.raises(jsonschema.ValidationError):
        validate_leader_worker_set(doc)
    doc = leader_worker_set_manifest(group_trainer(), BARE)
    doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_leader_worker_set(doc)


def test_a_group_needs_two_nodes_and_valid_replicas() -> None:
    from control_plane.scheduler.k8s_errors import WorkloadSpecError
    from tests.k8s.test_manifests import BARE

    with pytest.raises(WorkloadSpecError, match="nodes >= 2"):
        leader_worker_set_manifest(trainer_spec(), BARE)
    with pytest.raises(WorkloadSpecError, match="nodes must be >= 1"):
        workload_manifests(trainer_spec(nodes=0), BARE)
    with pytest.raises(WorkloadSpecError, match="replicas"):
        workload_manifests(group_trainer(replicas=-1), BARE)


async def test_a_crd_installed_later_is_used_at_once() -> None:
    """The watch found no LeaderWorkerSet API; the CRD is installed; a group created then is
    scaled and removed like any other (the successful create proves the API is served)."""
    cluster = Cluster(lws=False).start()
    b = KubernetesBackend.from_settings(backend_settings(cluster.url))
    try:
        assert await b.wait_synced(5.0) and not b.groups.served
        cluster.install_lws()
        spec = group_trainer()
        await b.ensure(spec)
        name = workload_name(spec.workload_id, spec.role)
        assert cluster.get(LEADERWORKERSETS, name) is not None and b.groups.served
        await b.scale(spec.workload_id, spec.role, 0)
        assert cluster.get(LEADERWORKERSETS, name)["spec"]["replicas"] == 0
        await b.remove(spec.workload_id, spec.role)
        assert cluster.objects(LEADERWORKERSETS) == {}
    finally:
        await b.close()
        cluster.stop()
