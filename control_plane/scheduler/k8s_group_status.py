"""Pure mapping of a LeaderWorkerSet (a multi-node workload) and its pods to an ``Observation``.
No I/O, no ``kubernetes`` import. Each pod is judged as in ``k8s_status.pod_finding``; a group
is one unit, so it is up only when every one of its pods is:

* no LeaderWorkerSet (or one being deleted)          -> ABSENT
* ``spec.replicas == 0``                             -> SCALED_DOWN
* any pod FAILED (CrashLoopBackOff, OOMKilled, evicted,
  unschedulable past the grace, ...)                 -> FAILED "<leader|worker N>: <pod's reason>"
  (the LWS controller recreates the whole group: ``RecreateGroupOnPodRestart``)
* every pod of every group exists and is Ready       -> READY (endpoint: the Service, which
                                                        selects the leader)
* otherwise the most severe finding of a pod that is not ready (UNHEALTHY > STARTING >
  PENDING), or PENDING "waiting for group pods to be created (k of n)"
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from control_plane.scheduler.k8s_manifests import (
    CONTAINER_PORT_NAME,
    LABEL_LWS_WORKER_INDEX,
    LWS_LEADER_INDEX,
    endpoint_url,
)
from control_plane.scheduler.k8s_status import SEVERITY, pod_finding
from control_plane.scheduler.protocol import Observation, Phase, WorkloadRole


def group_size(lws: dict[str, Any]) -> int:
    """Pods per group (``spec.leaderWorkerTemplate.size``, default 1)."""
    size = ((lws.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("size")
    return 1 if size is None else int(size)


def group_replicas(lws: dict[str, Any]) -> int:
    """Groups wanted (``spec.replicas``, default 1)."""
    replicas = (lws.get("spec") or {}).get("replicas")
    return 1 if replicas is None else int(replicas)


def leader_port(lws: dict[str, Any]) -> int | None:
    template = ((lws.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("leaderTemplate") or {}
    for c in (template.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == CONTAINER_PORT_NAME and p.get("containerPort"):
                return int(p["containerPort"])
    return None


def _worker_index(pod: dict[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_LWS_WORKER_INDEX)


def pod_role(pod: dict[str, Any]) -> str:
    """``leader`` or ``worker N`` from the index the LWS controller labels the pod with."""
    index = _worker_index(pod)
    if index is None:
        return f"pod {(pod.get('metadata') or {}).get('name')}"
    return "leader" if index == LWS_LEADER_INDEX else f"worker {index}"


def _order(pod: dict[str, Any]) -> tuple[int, str]:
    """Leader first, then the workers by index (then by name: several groups)."""
    index = _worker_index(pod)
    name = str((pod.get("metadata") or {}).get("name"))
    return (int(index) if index is not None and index.isdigit() else 1 << 30, name)


def observe_group(
    workload_id: str,
    role: WorkloadRole,
    lws: dict[str, Any] | None,
    pods: Iterable[dict[str, Any]],
    *,
    now: datetime | None = None,
    unschedulable_grace: float = 300.0,
    cluster_domain: str = "cluster.local",
    was_ready: Callable[[dict[str, Any]], bool] = lambda pod: False,
) -> Observation:
    now = now or datetime.now(UTC)

    def obs(
        phase: Phase, reason: str | None = None, exit_code: int | None = None, endpoint: str | None = None
    ) -> Observation:
        return Observation(workload_id, role, phase, reason=reason, endpoint=endpoint, exit_code=exit_code)

    if lws is None:
        return obs(Phase.ABSENT)
    meta = lws.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return obs(Phase.ABSENT, "being deleted")
    pods = list(pods)
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    replicas = group_replicas(lws)
    if replicas == 0:
        n = len(pods)
        return obs(Phase.SCALED_DOWN, f"{n} pod(s) still terminating" if n else None)

    port = leader_port(lws)
    endpoint = (
        endpoint_url(meta.get("name", ""), meta.get("namespace", ""), port, cluster_domain)
        if port is not None
        else None
    )
    want = group_size(lws) * replicas
    # leader first, then the workers in index order: the first failure named is the lowest pod
    live.sort(key=_order)
    findings = [(pod_role(p), *pod_finding(p, now, unschedulable_grace, was_ready(p))) for p in live]
    failed = [f for f in findings if f[1] == Phase.FAILED]
    if failed:
        who, _, reason, code = failed[0]
        return obs(Phase.FAILED, f"{who}: {reason}", code, endpoint=endpoint)
    ready = sum(1 for f in findings if f[1] == Phase.READY)
    if ready >= want:
        return obs(Phase.READY, endpoint=endpoint)
    waiting = [f for f in findings if f[1] != Phase.READY]
    if waiting:
        who, phase, reason, code = max(waiting, key=lambda f: SEVERITY[f[1]])
        return obs(phase, f"{who}: {reason}" if reason else who, code, endpoint=endpoint)
    return obs(Phase.PENDING, f"waiting for group pods to be created ({len(live)} of {want})", endpoint=endpoint)


__all__ = ["group_replicas", "group_size", "leader_port", "observe_group", "pod_role"]
