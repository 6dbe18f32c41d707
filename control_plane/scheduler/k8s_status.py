"""Pure mapping of a Deployment and its pods (plain dicts as the API returns them) to an
``Observation``. No I/O, no ``kubernetes`` import.

Rules, in order:

* no Deployment (or one being deleted)              -> ABSENT
* ``spec.replicas == 0``                            -> SCALED_DOWN (reason notes pods still terminating)
* any pod Ready                                     -> READY
* otherwise the most severe pod finding wins (FAILED > UNHEALTHY > STARTING > PENDING):
  - pod phase Failed (Evicted, ...)                 -> FAILED "Evicted: ..."
  - container terminated / CrashLoopBackOff         -> FAILED "OOMKilled (exit code 137)",
                                                       "CrashLoopBackOff (last exit code 1: Error)",
                                                       "Completed (exit code 0)", "Error (exit code 2)"
  - ImagePullBackOff / ErrImagePull / InvalidImageName /
    CreateContainerConfigError / CreateContainerError -> FAILED "<reason>: <message>"
  - PodScheduled False (Unschedulable)              -> PENDING for ``unschedulable_grace`` seconds
                                                       (an autoscaler may add a node), then FAILED
  - running, startup passed, not ready, and the pod
    was ready before                                -> UNHEALTHY
  - running, not ready                              -> STARTING
  - anything else (ContainerCreating, no pods yet)  -> PENDING
* Deployment condition ReplicaFailure True and no pods -> FAILED (quota, admission)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from control_plane.scheduler.k8s_manifests import CONTAINER_PORT_NAME, endpoint_url
from control_plane.scheduler.protocol import Observation, Phase, WorkloadRole

FAILED_WAITING_REASONS = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)

SEVERITY = {Phase.FAILED: 4, Phase.UNHEALTHY: 3, Phase.STARTING: 2, Phase.PENDING: 1}


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _cond(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def _with_message(reason: str, message: str | None) -> str:
    return f"{reason}: {message}" if message else reason


def _terminated_reason(term: dict[str, Any]) -> tuple[str, int | None]:
    code = term.get("exitCode")
    reason = term.get("reason") or ("Completed" if code == 0 else "Error")
    text = f"{reason} (exit code {code})" if code is not None else reason
    return text, code


def pod_finding(
    pod: dict[str, Any], now: datetime, unschedulable_grace: float, was_ready: bool = False
) -> tuple[Phase, str | None, int | None]:
    """(phase, reason, exit_code) for one pod that exists and is not being deleted."""
    status = pod.get("status") or {}
    pod_phase = status.get("phase") or "Pending"
    statuses = list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])

    ready = _cond(pod, "Ready")
    if pod_phase == "Running" and ready and ready.get("status") == "True":
        return Phase.READY, None, None

    if pod_phase == "Failed":
        for cs in statuses:
            term = (cs.get("state") or {}).get("terminated")
            if term and term.get("exitCode") not in (None, 0):
                text, code = _terminated_reason(term)
                return Phase.FAILED, text, code
        return Phase.FAILED, _with_message(status.get("reason") or "Failed", status.get("message")), None
    if pod_phase == "Succeeded":
        return Phase.FAILED, "Completed (exit code 0)", 0

    sched = _cond(pod, "PodScheduled")
    if sched and sched.get("status") == "False":
        reason = _with_message(sched.get("reason") or "Unschedulable", sched.get("message"))
        since = parse_time(sched.get("lastTransitionTime")) or parse_time(
            (pod.get("metadata") or {}).get("creationTimestamp")
        )
        if since is not None and (now - since).total_seconds() >= unschedulable_grace:
            return Phase.FAILED, reason, None
        return Phase.PENDING, reason, None

    best: tuple[Phase, str | None, int | None] = (Phase.PENDING, status.get("reason"), None)
    for cs in statuses:
        state = cs.get("state") or {}
        last_term = (cs.get("lastState") or {}).get("terminated") or {}
        finding: tuple[Phase, str | None, int | None] | None = None
        if waiting := state.get("waiting"):
            wreason = waiting.get("reason") or "Waiting"
            if wreason == "CrashLoopBackOff":
                if last_term:
                    text, code = _terminated_reason(last_term)
                    if last_term.get("reason") == "OOMKilled":
                        finding = (Phase.FAILED, f"{text}, CrashLoopBackOff", code)
                    else:
                        finding = (
                            Phase.FAILED,
                            f"CrashLoopBackOff (last exit code {code}: {last_term.get('reason') or 'Error'})",
                            code,
                        )
                else:
                    finding = (Phase.FAILED, _with_message("CrashLoopBackOff", waiting.get("message")), None)
            elif wreason in FAILED_WAITING_REASONS:
                finding = (Phase.FAILED, _with_message(wreason, waiting.get("message")), None)
            else:  # ContainerCreating, PodInitializing
                finding = (Phase.PENDING, wreason, None)
        elif term := state.get("terminated"):
            text, code = _terminated_reason(term)
            finding = (Phase.FAILED, text, code)
        elif state.get("running") is not None:
            if cs.get("ready"):
                finding = (Phase.STARTING, "containers ready, pod not ready yet", None)
            elif cs.get("started") and was_ready:
                finding = (Phase.UNHEALTHY, "running but failing its readiness probe", None)
            else:
                reason = "running, not ready (loading)"
                if last_term:
                    text, code = _terminated_reason(last_term)
                    reason = f"restarted after {text}"
                finding = (Phase.STARTING, reason, None)
        if (finding and SEVERITY[finding[0]] > SEVERITY[best[0]]) or (
            finding and best[1] is None and finding[0] == best[0]
        ):
            best = finding
    if best[0] == Phase.PENDING and best[1] is None:
        best = (Phase.PENDING, "scheduled, starting containers" if sched else "waiting to be scheduled", None)
    return best


def deployment_port(deployment: dict[str, Any]) -> int | None:
    containers = (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    for c in containers:
        for p in c.get("ports") or []:
            if p.get("name") == CONTAINER_PORT_NAME and p.get("containerPort"):
                return int(p["containerPort"])
    return None


def observe_workload(
    workload_id: str,
    role: WorkloadRole,
    deployment: dict[str, Any] | None,
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

    if deployment is None:
        return obs(Phase.ABSENT)
    meta = deployment.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return obs(Phase.ABSENT, "being deleted")

    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    terminating = [p for p in pods if (p.get("metadata") or {}).get("deletionTimestamp")]
    replicas = (deployment.get("spec") or {}).get("replicas")
    desired = 1 if replicas is None else int(replicas)
    if desired == 0:
        n = len(live) + len(terminating)
        return obs(Phase.SCALED_DOWN, f"{n} pod(s) still terminating" if n else None)

    port = deployment_port(deployment)
    endpoint = (
        endpoint_url(meta.get("name", ""), meta.get("namespace", ""), port, cluster_domain)
        if port is not None
        else None
    )

    findings = [pod_finding(p, now, unschedulable_grace, was_ready(p)) for p in live]
    if any(f[0] == Phase.READY for f in findings):
        return obs(Phase.READY, endpoint=endpoint)
    if not findings:
        failure = _cond(deployment, "ReplicaFailure")
        if failure and failure.get("status") == "True":
            return obs(
                Phase.FAILED,
                _with_message(failure.get("reason") or "ReplicaFailure", failure.get("message")),
                endpoint=endpoint,
            )
        return obs(Phase.PENDING, "waiting for pods to be created", endpoint=endpoint)
    phase, reason, code = max(findings, key=lambda f: SEVERITY[f[0]])
    return obs(phase, reason, code, endpoint=endpoint)
