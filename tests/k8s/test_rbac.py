"""The chart's Role grants exactly what the backend calls: every (group, resource, verb) seen on
the wire during a full lifecycle (workload logs and usage included) is granted, and nothing is
granted that was not called."""

from __future__ import annotations

import kmock

from control_plane.scheduler.k8s_manifests import BACKEND_PERMISSIONS, workload_name
from control_plane.scheduler.kubernetes import KubernetesBackend
from control_plane.scheduler.protocol import LogQuery, Phase
from tests.k8s.conftest import (
    Cluster,
    Kubelet,
    backend_settings,
    running,
    sampler_spec,
    served_model_spec,
    trainer_spec,
    wait_phase,
)
from tests.k8s.test_backend_logs_usage import PodLogs
from tests.k8s.test_helm import VALUES_FILES, by_kind, load_values, render


def verb_of(request: kmock.Request) -> str:
    method = request.method.value.upper()
    if method == "GET":
        if request.name:
            return "get"
        return "watch" if request.params.get("watch") in ("true", "1") else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


async def exercise_backend(cluster: Cluster) -> set[tuple[str, str, str]]:
    """Everything the controller can ask of the backend, including a restart, the direct-read
    fallback of observe and the error paths; returns the permissions used on the wire."""
    kubelet = Kubelet(cluster)
    PodLogs(cluster)  # the kubelet's log endpoint
    before = len(cluster.requests())  # the test's own Kubelet calls are excluded below
    b = KubernetesBackend.from_settings(backend_settings(cluster.url))
    group = trainer_spec("run:group", nodes=2)  # a LeaderWorkerSet
    specs = [trainer_spec(), sampler_spec(), served_model_spec(), group]
    try:
        for spec in specs:
            await b.ensure(spec)
            await b.ensure(spec)  # 409 -> get
        await b.scale(group.workload_id, group.role, 0)
        smp = specs[1]
        pod = kubelet.create_pod(workload_name(smp.workload_id, smp.role))
        kubelet.set_status(pod, running("sampler", ready=True, started=True))
        await wait_phase(b, smp, phase=Phase.READY)
        assert (await b.describe(smp.workload_id, smp.role)).observation.phase == Phase.READY
        await b.logs(smp.workload_id, smp.role, LogQuery(0, 2**62, 10, "desc"))  # pods/log
        assert len(await b.usage(smp.workload_id, smp.role)) == 1  # metrics.k8s.io pods
        await b.scale(specs[2].workload_id, specs[2].role, 0)
        await b.scale(specs[2].workload_id, specs[2].role, 1)
        assert len(await b.list_workloads()) == 4
        for spec in specs:
            await b.remove(spec.workload_id, spec.role)
            await b.remove(spec.workload_id, spec.role)
    finally:
        await b.close()
    # observe before the caches are synced reads directly (get deployment and leaderworkerset,
    # list pods)
    cold = KubernetesBackend.from_settings(backend_settings(cluster.url, api_timeout_seconds=0.5))
    cold._started = True
    try:
        assert (await cold.observe("x", specs[0].role)).phase == Phase.ABSENT
    finally:
        await cold.close()

    kubelet_pods = {("", "pods", "create"), ("", "pods", "patch"), ("", "pods", "delete")}
    used = set()
    for r in cluster.requests()[before:]:
        if r.resource is None:
            continue
        perm = (r.resource.group, r.resource.plural + (f"/{r.subresource}" if r.subresource else ""), verb_of(r))
        used.add(perm)
    used -= kubelet_pods | {("", "pods/status", "patch")}
    return used


def role_permissions(values: dict) -> set[tuple[str, str, str]]:
    (role,) = by_kind(render(values), "Role")
    return {
        (g, res, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for res in rule["resources"]
        for v in rule["verbs"]
    }


async def test_role_grants_exactly_what_the_backend_calls(cluster: Cluster) -> None:
    used = await exercise_backend(cluster)
    # the declared lists are the truth about the code
    assert used == set(BACKEND_PERMISSIONS)
    for case in VALUES_FILES:
        granted = role_permissions(load_values(case))
        assert used - granted == set(), f"{case}: backend calls not granted"
        assert granted - used == set(), f"{case}: granted but never called"
        assert not any("*" in p for perm in granted for p in perm)
