"""KubernetesBackend over HTTP against kmock's emulator, with the real ``kubernetes`` client.

Nothing of ours is patched: the emulator (tests/k8s/conftest.py) stands in for the API server,
``Kubelet`` for the ReplicaSet controller and kubelet (it creates pods and patches their status).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import kmock
import pytest
from kubernetes.client.exceptions import ApiException

from control_plane.scheduler.k8s_errors import (
    KubernetesApiError,
    KubernetesBackendError,
    KubernetesConfigError,
    KubernetesPermissionError,
    KubernetesUnavailableError,
    WorkloadNotFoundError,
    WorkloadSpecError,
)
from control_plane.scheduler.k8s_manifests import (
    ANN_WORKLOAD_ID,
    LABEL_MANAGED_BY,
    LABEL_ORG,
    LABEL_ROLE,
    LABEL_SESSION,
    LABEL_WORKLOAD,
    LABEL_WORKLOAD_ID,
    workload_name,
)
from control_plane.scheduler.kubernetes import KubernetesBackend
from control_plane.scheduler.protocol import (
    BackendError,
    Phase,
    Resources,
    SchedulerBackend,
    TransientBackendError,
    WorkloadRole,
)
from control_plane.settings import Settings
from tests.k8s.conftest import (
    DEPLOYMENTS,
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
    scheduled,
    served_model_spec,
    terminated,
    trainer_spec,
    unschedulable,
    wait_phase,
    waiting,
)


def test_backend_satisfies_the_protocol(cluster: Cluster) -> None:
    b = KubernetesBackend.from_settings(backend_settings(cluster.url))
    assert isinstance(b, SchedulerBackend)
    assert b.name == "kubernetes"


async def test_ensure_creates_deployment_and_owned_service(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = sampler_spec()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)

    deps, svcs = cluster.objects(DEPLOYMENTS), cluster.objects(SERVICES)
    assert list(deps) == [name] and list(svcs) == [name]
    dep, svc = deps[name], svcs[name]

    labels = dep["metadata"]["labels"]
    assert labels[LABEL_MANAGED_BY] == "openloops"
    assert labels[LABEL_ROLE] == "sampler"
    assert labels[LABEL_ORG] == "org_ACME"  # already label-safe: unchanged
    assert labels[LABEL_SESSION].startswith("sess_42-")  # ':' sanitized, hash-suffixed
    assert labels[LABEL_WORKLOAD_ID].startswith("smp_Alpha-01-")
    assert dep["metadata"]["annotations"][ANN_WORKLOAD_ID] == "smp:Alpha-01"  # the exact id
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["selector"]["matchLabels"] == {LABEL_WORKLOAD: name}
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"] == labels

    pod = tmpl["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/openloops/sampler:0.1.0"
    assert c["command"] == list(spec.command)
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
    }
    assert pod["nodeSelector"] == {"openloops.dev/pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "openloops-workers"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "openloops-worker"
    assert pod["automountServiceAccountToken"] is False
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    env = {e["name"]: e for e in c["env"]}
    assert env["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "info"}
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[secret] == {"name": secret, "valueFrom": {"secretKeyRef": {"name": WORKER_SECRET, "key": secret}}}
    assert all("value" not in e for e in c["env"] if e["name"].startswith("AWS_"))
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}

    assert svc["metadata"]["labels"] == labels
    assert svc["metadata"]["ownerReferences"] == [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": dep["metadata"]["uid"], "controller": True}
    ]
    assert svc["spec"]["selector"] == {LABEL_WORKLOAD: name}
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


async def test_trainer_has_no_service_and_no_probes(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = trainer_spec(resources=Resources(cpu="2", memory="8Gi"))
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    dep = cluster.get(DEPLOYMENTS, name)
    assert dep is not None and cluster.objects(SERVICES) == {}
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example.com/openloops/trainer:0.1.0"
    assert not {"ports", "startupProbe", "readinessProbe", "livenessProbe", "volumeMounts"} & set(c)
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    pod = dep["spec"]["template"]["spec"]
    assert "nvidia.com/gpu.product" not in pod["nodeSelector"]
    assert all(t["key"] != "nvidia.com/gpu" for t in pod["tolerations"])


async def test_ensure_is_idempotent(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = served_model_spec()
    for _ in range(3):
        await backend.ensure(spec)
    assert len(cluster.objects(DEPLOYMENTS)) == 1 and len(cluster.objects(SERVICES)) == 1
    # every create after the first answered 409 and was taken as "already there"
    assert cluster.count("POST", DEPLOYMENTS) == 3
    assert cluster.count("POST", SERVICES) == 3
    svc = next(iter(cluster.objects(SERVICES).values()))
    dep = next(iter(cluster.objects(DEPLOYMENTS).values()))
    assert svc["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]


async def test_ensure_recreates_a_missing_service(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = sampler_spec()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    cluster.core.delete_namespaced_service(name, NAMESPACE)
    assert cluster.objects(SERVICES) == {}
    await backend.ensure(spec)  # the Deployment exists (409); the Service is created again
    svc = cluster.get(SERVICES, name)
    assert svc is not None
    assert svc["metadata"]["ownerReferences"][0]["uid"] == cluster.get(DEPLOYMENTS, name)["metadata"]["uid"]


async def test_backend_restart_creates_no_duplicates_and_sees_existing_state(
    cluster: Cluster, kubelet: Kubelet
) -> None:
    spec = sampler_spec()
    first = KubernetesBackend.from_settings(backend_settings(cluster.url))
    await first.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    pod = kubelet.create_pod(name)
    kubelet.set_status(pod, running("sampler", ready=True, started=True))
    await wait_phase(first, spec, phase=Phase.READY)
    await first.close()

    second = KubernetesBackend.from_settings(backend_settings(cluster.url))
    try:
        obs = await second.observe(spec.workload_id, spec.role)  # from its first LIST
        assert obs.phase == Phase.READY
        await second.ensure(spec)
        assert len(cluster.objects(DEPLOYMENTS)) == 1 and len(cluster.objects(SERVICES)) == 1
        assert await second.list_workloads() == [(spec.workload_id, WorkloadRole.SAMPLER)]
    finally:
        await second.close()


async def test_watch_drives_observations_without_relisting(
    backend: KubernetesBackend, cluster: Cluster, kubelet: Kubelet
) -> None:
    spec = sampler_spec()
    assert (await backend.observe(spec.workload_id, spec.role)).phase == Phase.ABSENT
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    obs = await wait_phase(backend, spec, phase=Phase.PENDING)
    assert obs.reason == "waiting for pods to be created"
    lists_before = cluster.count("GET", PODS, watch=False)

    pod = kubelet.create_pod(name, status={"phase": "Pending"})
    kubelet.set_status(pod, waiting("sampler", "ContainerCreating"))
    obs = await wait_phase(backend, spec, phase=Phase.PENDING)
    kubelet.set_status(pod, running("sampler", ready=False, started=False))
    obs = await wait_phase(backend, spec, phase=Phase.STARTING)
    assert obs.reason == "running, not ready (loading)"
    kubelet.set_status(pod, running("sampler", ready=True, started=True))
    obs = await wait_phase(backend, spec, phase=Phase.READY)
    assert obs.endpoint == f"http://{name}.{NAMESPACE}.svc.cluster.local:8000"
    assert obs.reason is None and obs.exit_code is None

    # readiness lost after having been ready: unhealthy, not starting
    kubelet.set_status(pod, running("sampler", ready=False, started=True))
    obs = await wait_phase(backend, spec, phase=Phase.UNHEALTHY)
    assert "readiness" in (obs.reason or "")

    # all of it came through the watch: no further LIST of pods
    assert cluster.count("GET", PODS, watch=False) == lists_before
    assert backend.pods.relists == 1


FAILURES = [
    pytest.param(
        scheduled("sampler", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, phase="Running", restarts=1),
        Phase.FAILED,
        "OOMKilled (exit code 137)",
        137,
        id="oomkilled",
    ),
    pytest.param(
        waiting(
            "sampler",
            "CrashLoopBackOff",
            "back-off 40s restarting failed container",
            restarts=3,
            last={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        ),
        Phase.FAILED,
        "OOMKilled (exit code 137), CrashLoopBackOff",
        137,
        id="oomkilled-crashloop",
    ),
    pytest.param(
        waiting("sampler", "ImagePullBackOff", 'Back-off pulling image "registry.example.com/openloops/sampler:0.1.0"'),
        Phase.FAILED,
        'ImagePullBackOff: Back-off pulling image "registry.example.com/openloops/sampler:0.1.0"',
        None,
        id="imagepullbackoff",
    ),
    pytest.param(
        waiting("sampler", "ErrImagePull", "manifest unknown"),
        Phase.FAILED,
        "ErrImagePull: manifest unknown",
        None,
        id="errimagepull",
    ),
    pytest.param(
        waiting("sampler", "CrashLoopBackOff", "back-off", restarts=5, last=terminated(3, "Error")),
        Phase.FAILED,
        "CrashLoopBackOff (last exit code 3: Error)",
        3,
        id="crashloopbackoff",
    ),
    pytest.param(
        waiting("sampler", "CreateContainerConfigError", 'secret "openloops-worker" not found'),
        Phase.FAILED,
        'CreateContainerConfigError: secret "openloops-worker" not found',
        None,
        id="missing-secret",
    ),
    pytest.param(
        lambda: unschedulable(ago=3600),
        Phase.FAILED,
        "Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        None,
        id="unschedulable-past-grace",
    ),
    pytest.param(
        lambda: unschedulable(ago=5),  # built when the test runs, not at collection
        Phase.PENDING,
        "Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        None,
        id="unschedulable-within-grace",
    ),
    pytest.param(
        scheduled("sampler", terminated(2, "Error")),
        Phase.FAILED,
        "Error (exit code 2)",
        2,
        id="error-exit-code",
    ),
    pytest.param(
        scheduled("sampler", terminated(0, "Completed")),
        Phase.FAILED,
        "Completed (exit code 0)",
        0,
        id="completed",
    ),
    pytest.param(
        {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."},
        Phase.FAILED,
        "Evicted: The node was low on resource: memory.",
        None,
        id="evicted",
    ),
    pytest.param(
        running("sampler", ready=False, started=False, restarts=1, last=terminated(1, "Error")),
        Phase.STARTING,
        "restarted after Error (exit code 1)",
        None,
        id="restarted",
    ),
]


@pytest.mark.parametrize(("status", "phase", "reason", "exit_code"), FAILURES)
async def test_pod_failure_reasons(
    backend: KubernetesBackend,
    kubelet: Kubelet,
    status: dict | Callable[[], dict],
    phase: Phase,
    reason: str,
    exit_code: int | None,
) -> None:
    spec = sampler_spec()
    await backend.ensure(spec)
    pod = kubelet.create_pod(workload_name(spec.workload_id, spec.role))
    await wait_phase(backend, spec, phase=Phase.PENDING)
    # time-relative statuses are callables: a timestamp taken at collection would be minutes
    # old by the time this runs in a full suite (and "within grace" would be past it)
    kubelet.set_status(pod, status() if callable(status) else status)
    obs = await wait_phase(backend, spec, phase=phase, reason=reason)
    assert (obs.phase, obs.reason) == (phase, reason)
    assert obs.exit_code == exit_code


async def test_one_ready_replica_makes_the_workload_ready(backend: KubernetesBackend, kubelet: Kubelet) -> None:
    spec = served_model_spec(replicas=2)
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    a = kubelet.create_pod(name, "aaaaa")
    b = kubelet.create_pod(name, "bbbbb")
    kubelet.set_status(a, waiting("deployment", "CrashLoopBackOff", restarts=2, last=terminated(1, "Error")))
    kubelet.set_status(b, running("deployment", ready=False, started=False))
    obs = await wait_phase(backend, spec, phase=Phase.FAILED)
    assert obs.reason == "CrashLoopBackOff (last exit code 1: Error)"
    kubelet.set_status(b, running("deployment", ready=True, started=True))
    await wait_phase(backend, spec, phase=Phase.READY)


async def test_remove_cleans_everything(backend: KubernetesBackend, cluster: Cluster, kubelet: Kubelet) -> None:
    keep = trainer_spec("run:keep-me")
    spec = sampler_spec()
    await backend.ensure(keep)
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    pod = kubelet.create_pod(name)
    kubelet.set_status(pod, running("sampler", ready=True, started=True))
    await wait_phase(backend, spec, phase=Phase.READY)

    await backend.remove(spec.workload_id, spec.role)
    # observe right after remove already answers ABSENT (read-your-writes)
    assert (await backend.observe(spec.workload_id, spec.role)).phase == Phase.ABSENT
    assert name not in cluster.objects(DEPLOYMENTS)
    assert cluster.objects(SERVICES) == {}
    assert cluster.objects(PODS) == {}  # garbage-collected through the owner reference
    (delete,) = [r for r in cluster.requests() if r.method.value.upper() == "DELETE" and r.resource == DEPLOYMENTS]
    assert delete.params.get("propagationPolicy") == "Background"
    # the other workload is untouched
    assert list(cluster.objects(DEPLOYMENTS)) == [workload_name(keep.workload_id, keep.role)]
    # idempotent
    await backend.remove(spec.workload_id, spec.role)
    assert await backend.list_workloads() == [(keep.workload_id, WorkloadRole.TRAINER)]


async def test_scale_to_zero_and_back(backend: KubernetesBackend, cluster: Cluster, kubelet: Kubelet) -> None:
    spec = served_model_spec()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    pod = kubelet.create_pod(name)
    kubelet.set_status(pod, running("deployment", ready=True, started=True))
    await wait_phase(backend, spec, phase=Phase.READY)

    await backend.scale(spec.workload_id, spec.role, 0)
    assert cluster.get(DEPLOYMENTS, name)["spec"]["replicas"] == 0
    obs = await backend.observe(spec.workload_id, spec.role)
    assert obs.phase == Phase.SCALED_DOWN and obs.reason == "1 pod(s) still terminating"
    kubelet.delete_pod(pod)  # the ReplicaSet controller scales the pods down

    async def nothing_left() -> bool:
        obs = await backend.observe(spec.workload_id, spec.role)
        return obs.phase == Phase.SCALED_DOWN and obs.reason is None

    await eventually(nothing_left, what="scaled down with no pods")
    assert cluster.get(SERVICES, name) is not None  # the definition stays

    await backend.scale(spec.workload_id, spec.role, 1)
    assert cluster.get(DEPLOYMENTS, name)["spec"]["replicas"] == 1
    await wait_phase(backend, spec, phase=Phase.PENDING)
    patches = [r for r in cluster.requests() if r.method.value.upper() == "PATCH" and r.resource == DEPLOYMENTS]
    assert [p.data for p in patches][-2:] == [
        {"spec": {"replicas": 0}, "metadata": patches[-2].data["metadata"]},
        {"spec": {"replicas": 1}, "metadata": patches[-1].data["metadata"]},
    ]
    assert all(p.headers.get("Content-Type") == "application/merge-patch+json" for p in patches)

    with pytest.raises(WorkloadNotFoundError):
        await backend.scale("nope", WorkloadRole.SAMPLER, 1)


async def test_list_workloads_for_garbage_collection(backend: KubernetesBackend, cluster: Cluster) -> None:
    specs = [trainer_spec("Run:A"), trainer_spec("run-a"), sampler_spec("smp:1"), served_model_spec("dep/Ünïcode")]
    for s in specs:
        await backend.ensure(s)
    # something in the namespace that openloops does not manage
    cluster.apps.create_namespaced_deployment(
        NAMESPACE,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "someone-else", "namespace": NAMESPACE, "labels": {"app": "x"}},
            "spec": {
                "selector": {"matchLabels": {"app": "x"}},
                "template": {
                    "metadata": {"labels": {"app": "x"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx"}]},
                },
            },
        },
    )
    got = await backend.list_workloads()
    assert got == sorted((s.workload_id, s.role) for s in specs)
    # the label selector was sent (a real apiserver filters; kmock does not, so we filter too)
    lists = [
        r
        for r in cluster.requests()
        if r.resource == DEPLOYMENTS and r.method.value.upper() == "GET" and r.params.get("watch") is None
    ]
    assert lists and all(r.params.get("labelSelector") == "app.kubernetes.io/managed-by=openloops" for r in lists)
    for wid, role in got:
        await backend.remove(wid, role)
    assert await backend.list_workloads() == []
    assert list(cluster.objects(DEPLOYMENTS)) == ["someone-else"]


async def test_watch_resumes_from_last_resource_version(
    backend: KubernetesBackend, cluster: Cluster, kubelet: Kubelet
) -> None:
    spec = sampler_spec()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    pod = kubelet.create_pod(name)
    await wait_phase(backend, spec, phase=Phase.PENDING)
    # observe() may have answered from its direct read before the watch delivered the pod:
    # wait for the watch's own event (a resourceVersion past the LIST's 1000)
    await eventually(
        lambda: int(backend.pods.resource_version or 0) > 1000, timeout=5, what="the watch to deliver the pod"
    )
    # kmock ignores timeoutSeconds, so each watch ends on the client's read timeout (~1.7 s
    # here) and is restarted from the last resourceVersion, without a new LIST
    await eventually(lambda: backend.pods.watches >= 2, timeout=6, what="a watch restart")
    watches = [r for r in cluster.requests() if r.resource == PODS and r.params.get("watch") == "true"]
    assert watches[0].params.get("resourceVersion")  # from the LIST
    assert watches[-1].params.get("resourceVersion") == backend.pods.resource_version
    assert backend.pods.relists == 1
    # and it still follows changes
    kubelet.set_status(pod, running("sampler", ready=True, started=True))
    await wait_phase(backend, spec, phase=Phase.READY)


async def test_410_gone_triggers_a_full_relist(backend: KubernetesBackend, cluster: Cluster, kubelet: Kubelet) -> None:
    spec = sampler_spec()
    await backend.ensure(spec)
    name = workload_name(spec.workload_id, spec.role)
    pod = kubelet.create_pod(name)
    await wait_phase(backend, spec, phase=Phase.PENDING)
    assert backend.pods.relists == 1

    # a change the watch never delivers (as if it happened while the watch was down) ...
    def silently_ready() -> None:
        obj = cluster.emu.objects[PODS, NAMESPACE, pod]
        obj.patch(
            {
                "status": running("sampler", ready=True, started=True),
                "metadata": {"resourceVersion": cluster.emu.next_rv()},
            }
        )
        cluster.emu.expired_below = cluster.emu.rv + 1  # ... and history compacted past it

    cluster.on_loop(silently_ready)
    obs = await wait_phase(backend, spec, phase=Phase.READY, timeout=8)
    assert obs.phase == Phase.READY
    assert backend.pods.relists >= 2


async def test_transient_api_errors_are_retried(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = served_model_spec()
    await backend.ensure(spec)
    cluster.on_loop(lambda: cluster.emu["patch", DEPLOYMENTS][:2] << 503)
    await backend.scale(spec.workload_id, spec.role, 0)
    assert cluster.count("PATCH", DEPLOYMENTS) == 3
    assert cluster.get(DEPLOYMENTS, workload_name(spec.workload_id, spec.role))["spec"]["replicas"] == 0


async def test_api_unavailable_after_the_retry_budget(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = served_model_spec()
    await backend.ensure(spec)
    cluster.on_loop(lambda: cluster.emu["patch", DEPLOYMENTS] << 503)
    with pytest.raises(KubernetesUnavailableError) as err:
        await backend.scale(spec.workload_id, spec.role, 0)
    assert not isinstance(err.value, ApiException)
    assert "after 4 attempts" in str(err.value)
    assert cluster.count("PATCH", DEPLOYMENTS) == 4


async def test_forbidden_is_not_retried(backend: KubernetesBackend, cluster: Cluster) -> None:
    cluster.on_loop(lambda: cluster.emu["post", DEPLOYMENTS] << 403)
    with pytest.raises(KubernetesPermissionError) as err:
        await backend.ensure(sampler_spec())
    assert err.value.status == 403
    assert cluster.count("POST", DEPLOYMENTS) == 1


async def test_observe_surfaces_a_forbidden_watch_quickly(backend: KubernetesBackend, cluster: Cluster) -> None:
    cluster.on_loop(lambda: cluster.emu["get", PODS] << 403)  # no list/watch pods permission
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(KubernetesPermissionError, match="list pods"):
        await backend.observe("smp:1", WorkloadRole.SAMPLER)
    assert loop.time() - t0 < 3.0
    assert backend.pods.last_error and "403" in backend.pods.last_error


async def test_unreachable_api_server_raises_our_error() -> None:
    b = KubernetesBackend.from_settings(backend_settings("http://127.0.0.1:9", api_timeout_seconds=1))
    try:
        with pytest.raises(KubernetesUnavailableError):
            await b.list_workloads()
    finally:
        await b.close()


async def test_invalid_specs_are_rejected_before_any_call(cluster: Cluster) -> None:
    b = KubernetesBackend.from_settings(backend_settings(cluster.url, worker_secret_name=None))
    try:
        with pytest.raises(WorkloadSpecError, match="worker_secret_name"):
            await b.ensure(sampler_spec())
        with pytest.raises(WorkloadSpecError):
            await b.ensure(sampler_spec(secret_env=[], command=[]))
        assert cluster.count("POST", DEPLOYMENTS) == 0
    finally:
        await b.close()


def test_from_settings(tmp_path, cluster: Cluster) -> None:
    # the application Settings (nested kubernetes settings from the environment)
    s = Settings(backend="kubernetes", kubernetes={"api_url": cluster.url, "namespace": "ns1"})
    b = KubernetesBackend.from_settings(s)
    assert b.namespace == "ns1" and b._cfg.host == cluster.url
    # a kubeconfig file
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
        f"clusters: [{{name: c, cluster: {{server: '{cluster.url}'}}}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: t, context: {cluster: c, user: u}}]\n"
    )
    b = KubernetesBackend.from_settings(
        backend_settings("", api_url=None, in_cluster=False, kubeconfig=str(kubeconfig))
    )
    assert b._cfg.host == cluster.url
    # in-cluster without a service account: a clear error, not a ConfigException
    with pytest.raises(KubernetesConfigError, match="in-cluster"):
        KubernetesBackend.from_settings(backend_settings("", api_url=None, in_cluster=True))
    with pytest.raises(KubernetesConfigError):
        KubernetesBackend.from_settings(
            backend_settings("", api_url=None, in_cluster=False, kubeconfig=str(tmp_path / "missing"))
        )


async def test_close_is_prompt_and_final(cluster: Cluster) -> None:
    b = KubernetesBackend.from_settings(backend_settings(cluster.url, watch_timeout_seconds=30))
    assert await b.wait_synced()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await b.close()
    assert loop.time() - t0 < 2.0  # in-flight watches are shut down, not waited out
    with pytest.raises(KubernetesBackendError):
        await b.ensure(sampler_spec())


async def test_errors_are_our_types(backend: KubernetesBackend, cluster: Cluster) -> None:
    cluster.on_loop(lambda: cluster.emu["post", SERVICES] << 422)
    with pytest.raises(KubernetesApiError) as err:
        await backend.ensure(sampler_spec())
    assert err.value.status == 422 and not isinstance(err.value, ApiException)
    assert issubclass(KubernetesApiError, KubernetesBackendError)
    _ = kmock  # the emulator library is what answers these


def k8s_event(name: str, kind: str, obj: str, reason: str, message: str, at: str, etype: str = "Normal") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "involvedObject": {"kind": kind, "name": obj, "namespace": NAMESPACE},
        "reason": reason,
        "message": message,
        "type": etype,
        "count": 1,
        "firstTimestamp": at,
        "lastTimestamp": at,
    }


async def test_describe_shows_objects_pods_and_their_events(
    backend: KubernetesBackend, cluster: Cluster, kubelet: Kubelet
) -> None:
    spec, other = sampler_spec(), sampler_spec("smp:other")
    await backend.ensure(spec)
    await backend.ensure(other)
    name, other_name = (workload_name(x.workload_id, x.role) for x in (spec, other))
    pod = kubelet.create_pod(name, "x1y2z")
    kubelet.set_status(pod, waiting("sampler", "CrashLoopBackOff", restarts=3, last=terminated(137, "OOMKilled")))
    for ev in (
        k8s_event(
            "e3", "Pod", pod, "BackOff", "Back-off restarting failed container", "2026-01-01T00:00:03Z", "Warning"
        ),
        k8s_event(
            "e1",
            "Deployment",
            name,
            "ScalingReplicaSet",
            f"Scaled up replica set {name}-5d8f7 to 1",
            "2026-01-01T00:00:01Z",
        ),
        k8s_event(
            "e2", "ReplicaSet", f"{name}-5d8f7", "SuccessfulCreate", f"Created pod: {pod}", "2026-01-01T00:00:02Z"
        ),
        k8s_event(
            "x1", "Deployment", other_name, "ScalingReplicaSet", "not about this workload", "2026-01-01T00:00:00Z"
        ),
        k8s_event("x2", "Pod", f"{other_name}-aaaaa", "Pulled", "not about this workload", "2026-01-01T00:00:00Z"),
    ):
        cluster.core.create_namespaced_event(NAMESPACE, ev)

    d = await backend.describe(spec.workload_id, spec.role)
    assert d.observation.phase == Phase.FAILED
    assert d.observation.reason == "OOMKilled (exit code 137), CrashLoopBackOff"
    assert d.details["deployment"] == name and d.details["service"] == name and d.details["replicas"] == 1
    assert d.details["pods"] == [{"name": pod, "phase": "Pending", "node": None, "ready": False, "restarts": 3}]
    assert [(e.object, e.reason, e.type) for e in d.events] == [
        (f"Deployment/{name}", "ScalingReplicaSet", "Normal"),
        (f"ReplicaSet/{name}-5d8f7", "SuccessfulCreate", "Normal"),
        (f"Pod/{pod}", "BackOff", "Warning"),
    ]
    assert (await backend.describe(spec.workload_id, spec.role, max_events=1)).events[0].reason == "BackOff"
    # a trainer has no Service; a missing workload is ABSENT with no objects
    await backend.ensure(trainer_spec())
    t = await backend.describe(trainer_spec().workload_id, WorkloadRole.TRAINER)
    assert t.details["service"] is None and t.details["pods"] == [] and t.observation.phase == Phase.PENDING
    gone = await backend.describe("nope", WorkloadRole.SERVED_MODEL)
    assert gone.observation.phase == Phase.ABSENT and gone.details["deployment"] is None and gone.events == []


def test_transient_and_permanent_errors_for_the_controller() -> None:
    assert issubclass(KubernetesUnavailableError, TransientBackendError)
    for permanent in (
        KubernetesApiError,
        KubernetesPermissionError,
        WorkloadSpecError,
        WorkloadNotFoundError,
        KubernetesConfigError,
    ):
        assert issubclass(permanent, BackendError) and not issubclass(permanent, TransientBackendError)
