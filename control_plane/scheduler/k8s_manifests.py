"""Pure builders of the Kubernetes objects the backend creates: plain data in, dicts out.

Nothing here talks to an API server or imports the ``kubernetes`` package, so every manifest can
be validated offline (``kubernetes-validate --strict``) and compared in tests.

A workload is a Deployment, or, when its spec asks for a group of several pods
(``WorkloadSpec.nodes > 1``), a ``leaderworkerset.x-k8s.io/v1`` LeaderWorkerSet (the LWS
controller must be installed in the cluster); an HTTP workload also gets a Service.

Naming: a workload ``(role, workload_id)`` maps to one DNS-1035 label used for both the
Deployment (or LeaderWorkerSet) and its Service::

    ol-{role}-{slug}-{hash10}      e.g.  ol-sampler-smp-01hzx3-5c0e2f7a1b

``slug`` is the id lowercased with every run of characters outside ``[a-z0-9]`` turned into
``-`` (truncated so the whole name fits in 63 characters); ``hash10`` is the first 10 hex
digits of ``sha256(role + NUL + workload_id)``, so ids that differ only in case or punctuation
(``Run:A`` vs ``run-a``) never collide. The exact id is kept in the annotation
``openloops.dev/workload-id``; the label of the same name holds a label-safe form.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from control_plane.scheduler.k8s_errors import WorkloadSpecError
from control_plane.scheduler.kubernetes_settings import KubernetesSettings
from control_plane.scheduler.protocol import Capacity, WorkloadRole, WorkloadSpec

DOMAIN = "openloops.dev"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "openloops"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_ORG = f"{DOMAIN}/org"
LABEL_SESSION = f"{DOMAIN}/session"
LABEL_WORKLOAD_ID = f"{DOMAIN}/workload-id"
LABEL_ROLE = f"{DOMAIN}/role"
LABEL_WORKLOAD = f"{DOMAIN}/workload"  # the object name; the pod selector
ANN_WORKLOAD_ID = f"{DOMAIN}/workload-id"  # exact id, any characters
ANN_ORG_ID = f"{DOMAIN}/org-id"
ANN_SESSION_ID = f"{DOMAIN}/session-id"
ANN_BASE_MODEL = f"{DOMAIN}/base-model"
ANN_SPEC_HASH = f"{DOMAIN}/spec-hash"

# the LeaderWorkerSet API (a custom resource: https://github.com/kubernetes-sigs/lws)
LWS_GROUP = "leaderworkerset.x-k8s.io"
LWS_VERSION = "v1"
LWS_API_VERSION = f"{LWS_GROUP}/{LWS_VERSION}"
LWS_PLURAL = "leaderworkersets"
LWS_KIND = "LeaderWorkerSet"
# labels the LWS controller puts on every pod of a group: the set's name, and the pod's index in
# its group (the leader is "0")
LABEL_LWS_NAME = "leaderworkerset.sigs.k8s.io/name"
LABEL_LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_LEADER_INDEX = "0"

CONTAINER_PORT_NAME = "http"
SHM_VOLUME = "dshm"
DEFAULT_HEALTH_PATH = "/health"

_ROLE_PREFIX = {
    WorkloadRole.TRAINER: "trainer",
    WorkloadRole.SAMPLER: "sampler",
    WorkloadRole.SERVED_MODEL: "served",
}
_MAX_NAME = 63  # Service names are DNS-1035 labels
_HASH_LEN = 10
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


# --- names and labels -----------------------------------------------------------------------


def _digest(*parts: str, n: int = _HASH_LEN) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:n]


def workload_name(workload_id: str, role: WorkloadRole | str) -> str:
    """Deterministic DNS-1035 name (<= 63 chars) of the Deployment and Service of a workload."""
    role = WorkloadRole(role)
    prefix = f"ol-{_ROLE_PREFIX[role]}-"
    suffix = _digest(role.value, workload_id)
    room = _MAX_NAME - len(prefix) - len(suffix) - 1
    slug = re.sub(r"[^a-z0-9]+", "-", workload_id.lower()).strip("-")[:room].strip("-")
    name = f"{prefix}{slug}-{suffix}" if slug else f"{prefix}{suffix}"
    assert len(name) <= _MAX_NAME and _DNS1035_RE.match(name), name
    return name


def is_dns1035_label(value: str) -> bool:
    return len(value) <= _MAX_NAME and bool(_DNS1035_RE.match(value))


def label_value(value: str) -> str:
    """A valid label value for ``value``: unchanged when it already is one, otherwise
    sanitized, truncated and suffixed with a short hash of the original (so distinct
    originals stay distinct)."""
    if len(value) <= 63 and _LABEL_VALUE_RE.match(value):
        return value
    digest = _digest(value, n=8)
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", value)[: 63 - len(digest) - 1]
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    return f"{cleaned}-{digest}" if cleaned else digest


def selector_labels(name: str) -> dict[str, str]:
    return {LABEL_WORKLOAD: name}


def workload_labels(spec: WorkloadSpec, name: str) -> dict[str, str]:
    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: "openloops",
        LABEL_COMPONENT: spec.role.value,
        LABEL_ROLE: spec.role.value,
        LABEL_ORG: label_value(spec.org_id),
        LABEL_WORKLOAD_ID: label_value(spec.workload_id),
        LABEL_WORKLOAD: name,
    }
    if spec.session_id:
        labels[LABEL_SESSION] = label_value(spec.session_id)
    return labels


def workload_annotations(spec: WorkloadSpec) -> dict[str, str]:
    ann = {
        ANN_WORKLOAD_ID: spec.workload_id,
        ANN_ORG_ID: spec.org_id,
        ANN_BASE_MODEL: spec.base_model,
    }
    if spec.session_id:
        ann[ANN_SESSION_ID] = spec.session_id
    return ann


def endpoint_url(name: str, namespace: str, port: int, cluster_domain: str = "cluster.local") -> str:
    host = f"{name}.{namespace}.svc"
    if cluster_domain:
        host = f"{host}.{cluster_domain.strip('.')}"
    return f"http://{host}:{port}"


# --- pod template pieces --------------------------------------------------------------------


def image_for(role: WorkloadRole, settings: KubernetesSettings) -> str:
    return settings.trainer_image if role == WorkloadRole.TRAINER else settings.sampler_image


def container_env(spec: WorkloadSpec, settings: KubernetesSettings) -> list[dict[str, Any]]:
    """Plain values from ``spec.env`` and, for each ``spec.secret_env`` name, a reference to the
    key of the same name in ``settings.worker_secret_name``. A secret name also present in
    ``spec.env`` is taken from the Secret (the plain value is dropped). ``spec.hf_secret``
    gives ``HF_TOKEN`` from that Secret's ``HF_TOKEN`` key."""
    secret_names = list(dict.fromkeys(spec.secret_env))
    for env_name in [*spec.env, *secret_names]:
        if not _ENV_NAME_RE.match(env_name):
            raise WorkloadSpecError(f"invalid environment variable name {env_name!r}")
    if secret_names and not settings.worker_secret_name:
        raise WorkloadSpecError(
            f"workload {spec.workload_id!r} needs secret env {secret_names} but "
            "kubernetes.worker_secret_name is not set"
        )
    env: list[dict[str, Any]] = [
        {"name": k, "value": str(v)} for k, v in sorted(spec.env.items()) if k not in secret_names
    ]
    env += [
        {
            "name": n,
            "valueFrom": {"secretKeyRef": {"name": settings.worker_secret_name, "key": n}},
        }
        for n in sorted(secret_names)
    ]
    if spec.hf_secret:
        env = [e for e in env if e["name"] != "HF_TOKEN"]
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": spec.hf_secret, "key": "HF_TOKEN"}}})
    return env


def container_resources(spec: WorkloadSpec, settings: KubernetesSettings) -> dict[str, Any]:
    """CPU and memory are requested; memory is also the limit (a runaway worker is OOM-killed,
    not its neighbours); CPU has no limit (throttling only slows tokenization/data loading).
    GPUs are an extended resource: a limit (the request defaults to it)."""
    r = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.cpu:
        requests["cpu"] = str(r.cpu)
    if r.memory:
        requests["memory"] = str(r.memory)
        limits["memory"] = str(r.memory)
    if r.gpus:
        limits[settings.gpu_resource_name] = str(int(r.gpus))
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def http_probes(spec: WorkloadSpec, settings: KubernetesSettings) -> dict[str, Any]:
    """startup (model loading, up to ``startup_timeout_seconds``), readiness and liveness."""
    if spec.port is None:
        return {}
    action = {"httpGet": {"path": spec.health_path or DEFAULT_HEALTH_PATH, "port": CONTAINER_PORT_NAME}}
    startup_period = 10
    return {
        "startupProbe": {
            **action,
            "periodSeconds": startup_period,
            "timeoutSeconds": 5,
            "failureThreshold": max(1, -(-settings.startup_timeout_seconds // startup_period)),
        },
        "readinessProbe": {**action, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {**action, "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
    }


def node_selector(spec: WorkloadSpec, settings: KubernetesSettings) -> dict[str, str]:
    sel = dict(settings.node_selector)
    if spec.capacity == Capacity.SPOT:
        sel.update(settings.spot_node_selector)
    if spec.resources.gpus and spec.resources.gpu_type:
        sel[settings.gpu_type_label] = spec.resources.gpu_type
    return sel


def tolerations(spec: WorkloadSpec, settings: KubernetesSettings) -> list[dict[str, Any]]:
    tols: list[dict[str, Any]] = [dict(t) for t in settings.tolerations]
    if spec.capacity == Capacity.SPOT:
        for t in settings.spot_tolerations:
            if t not in tols:
                tols.append(dict(t))
    if spec.resources.gpus and settings.tolerate_gpu_taint:
        gpu_tol: dict[str, Any] = {"key": settings.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"}
        if gpu_tol not in tols:
            tols.append(gpu_tol)
    return tols


def termination_grace_period(spec: WorkloadSpec, settings: KubernetesSettings) -> int:
    """Seconds between SIGTERM and SIGKILL (a spot node reclaimed, a scale-down, a removal): a
    trainer finishes its current op before it exits, which can take longer than a sampler's
    shutdown."""
    if spec.role == WorkloadRole.TRAINER:
        return settings.trainer_termination_grace_period_seconds
    return settings.termination_grace_period_seconds


def pod_template(spec: WorkloadSpec, settings: KubernetesSettings, name: str, *, serves: bool = True) -> dict[str, Any]:
    """The pod of a workload. ``serves=False``: the workers of a multi-node group that serves
    HTTP (only its leader listens; the workers have no port and no HTTP probes)."""
    if not spec.command:
        raise WorkloadSpecError(f"workload {spec.workload_id!r} has an empty command")
    container: dict[str, Any] = {
        "name": spec.role.value,
        "image": image_for(spec.role, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": [str(c) for c in spec.command],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    env = container_env(spec, settings)
    if env:
        container["env"] = env
    if spec.port is not None and not 1 <= spec.port <= 65535:
        raise WorkloadSpecError(f"invalid port {spec.port}")
    if spec.port is not None and serves:
        container["ports"] = [{"name": CONTAINER_PORT_NAME, "containerPort": spec.port, "protocol": "TCP"}]
    resources = container_resources(spec, settings)
    if resources:
        container["resources"] = resources
    if serves:
        container.update(http_probes(spec, settings))

    pod_spec: dict[str, Any] = {
        "containers": [container],
        # workers never call the Kubernetes API
        "automountServiceAccountToken": False,
        # many Services in one namespace would otherwise flood every worker's environment
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_period(spec, settings),
    }
    if spec.resources.shm:
        container["volumeMounts"] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
        pod_spec["volumes"] = [
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.resources.shm)}}
        ]
    if settings.service_account_name:
        pod_spec["serviceAccountName"] = settings.service_account_name
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    sel = node_selector(spec, settings)
    if sel:
        pod_spec["nodeSelector"] = sel
    tols = tolerations(spec, settings)
    if tols:
        pod_spec["tolerations"] = tols
    return {
        "metadata": {"labels": workload_labels(spec, name), "annotations": workload_annotations(spec)},
        "spec": pod_spec,
    }


# --- objects --------------------------------------------------------------------------------


def spec_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def deployment_manifest(spec: WorkloadSpec, settings: KubernetesSettings) -> dict[str, Any]:
    """The Deployment running one workload (``replicas: 0`` = scaled to zero).

    ``Recreate``: a trainer must never run twice at once for one run (two pods would consume
    the same op stream), and a GPU sampler cannot surge onto a GPU that is not there."""
    if spec.replicas < 0:
        raise WorkloadSpecError(f"replicas must be >= 0, got {spec.replicas}")
    name = workload_name(spec.workload_id, spec.role)
    manifest: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": workload_labels(spec, name),
            "annotations": workload_annotations(spec),
        },
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(name)},
            "template": pod_template(spec, settings, name),
        },
    }
    manifest["metadata"]["annotations"][ANN_SPEC_HASH] = spec_hash(manifest)
    return manifest


def leader_worker_set_manifest(spec: WorkloadSpec, settings: KubernetesSettings) -> dict[str, Any]:
    """The LeaderWorkerSet running a multi-node workload: ``spec.replicas`` groups (1, or 0 =
    scaled to zero) of ``spec.nodes`` pods each; pod 0 of a group is its leader.

    Leader and workers are the pod a Deployment would run (same labels, env, secrets, GPUs per
    pod, placement, grace period); when the workload serves HTTP only the leader has the port
    and the probes. ``RecreateGroupOnPodRestart``: a pod that restarts takes its whole group
    down and up again (torchrun's ranks cannot lose one of theirs). ``LeaderCreated``: the
    workers are created once the leader pod exists (they wait for it at the rendezvous; waiting
    for it to be *ready* would deadlock a leader whose readiness needs its workers)."""
    if spec.replicas < 0:
        raise WorkloadSpecError(f"replicas must be >= 0, got {spec.replicas}")
    if spec.nodes < 2:
        raise WorkloadSpecError(f"a LeaderWorkerSet is for nodes >= 2, got {spec.nodes}")
    name = workload_name(spec.workload_id, spec.role)
    manifest: dict[str, Any] = {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": workload_labels(spec, name),
            "annotations": workload_annotations(spec),
        },
        "spec": {
            "replicas": spec.replicas,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": spec.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": pod_template(spec, settings, name),
                "workerTemplate": pod_template(spec, settings, name, serves=False),
            },
        },
    }
    manifest["metadata"]["annotations"][ANN_SPEC_HASH] = spec_hash(manifest)
    return manifest


def workload_object_manifest(spec: WorkloadSpec, settings: KubernetesSettings) -> dict[str, Any]:
    """The object that runs ``spec``: a LeaderWorkerSet for a multi-node group, else a Deployment."""
    if spec.nodes < 1:
        raise WorkloadSpecError(f"nodes must be >= 1, got {spec.nodes}")
    if spec.nodes > 1:
        return leader_worker_set_manifest(spec, settings)
    return deployment_manifest(spec, settings)


def owner_reference(owner_name: str, uid: str, *, group: bool = False) -> dict[str, Any]:
    """The Deployment (or, ``group``, the LeaderWorkerSet) that owns a workload's Service."""
    # No blockOwnerDeletion: setting it needs update on deployments/finalizers.
    return {
        "apiVersion": LWS_API_VERSION if group else "apps/v1",
        "kind": LWS_KIND if group else "Deployment",
        "name": owner_name,
        "uid": uid,
        "controller": True,
    }


def service_manifest(spec: WorkloadSpec, settings: KubernetesSettings, owner_uid: str | None) -> dict[str, Any] | None:
    """ClusterIP Service in front of an HTTP workload, owned by its Deployment or LeaderWorkerSet
    (so deleting that garbage-collects it). A multi-node group's Service selects its leader pod
    only. ``None`` when the workload serves no HTTP."""
    if spec.port is None:
        return None
    name = workload_name(spec.workload_id, spec.role)
    group = spec.nodes > 1
    meta: dict[str, Any] = {
        "name": name,
        "namespace": settings.namespace,
        "labels": workload_labels(spec, name),
        "annotations": workload_annotations(spec),
    }
    if owner_uid:
        meta["ownerReferences"] = [owner_reference(name, owner_uid, group=group)]
    selector = selector_labels(name)
    if group:
        selector[LABEL_LWS_WORKER_INDEX] = LWS_LEADER_INDEX
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": CONTAINER_PORT_NAME,
                    "port": spec.port,
                    "targetPort": CONTAINER_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def scale_patch(replicas: int) -> dict[str, Any]:
    return {"spec": {"replicas": int(replicas)}}


def workload_manifests(
    spec: WorkloadSpec, settings: KubernetesSettings, owner_uid: str | None = "00000000-0000-0000-0000-000000000000"
) -> list[dict[str, Any]]:
    """Everything ``ensure`` creates for ``spec`` (the Service's owner uid is a placeholder
    unless given): for previews and offline validation."""
    docs = [workload_object_manifest(spec, settings)]
    svc = service_manifest(spec, settings, owner_uid)
    if svc is not None:
        docs.append(svc)
    return docs


# --- what the backend needs from the API server -------------------------------------------

# Every (apiGroup, resource, verb) KubernetesBackend calls, in its namespace. The Helm chart's
# Role grants exactly these; tests/k8s checks both directions against the calls really made.
BACKEND_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("apps", "deployments", "create"),
        ("apps", "deployments", "get"),
        ("apps", "deployments", "list"),
        ("apps", "deployments", "watch"),
        ("apps", "deployments", "patch"),
        ("apps", "deployments", "delete"),
        # multi-node workloads (WorkloadSpec.nodes > 1)
        (LWS_GROUP, LWS_PLURAL, "create"),
        (LWS_GROUP, LWS_PLURAL, "get"),
        (LWS_GROUP, LWS_PLURAL, "list"),
        (LWS_GROUP, LWS_PLURAL, "watch"),
        (LWS_GROUP, LWS_PLURAL, "patch"),
        (LWS_GROUP, LWS_PLURAL, "delete"),
        ("", "services", "create"),
        ("", "services", "delete"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "events", "list"),  # describe (admin CLI)
        ("", "pods/log", "get"),  # logs (GET /v1/loops/deployments/{id}/logs)
        ("metrics.k8s.io", "pods", "get"),  # usage (deployment metrics; metrics-server is optional)
    }
)


def backend_role_rules() -> list[dict[str, Any]]:
    """``BACKEND_PERMISSIONS`` as RBAC PolicyRules, one per (group, resource)."""
    grouped: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in BACKEND_PERMISSIONS:
        grouped.setdefault((group, resource), set()).add(verb)
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
        for (group, resource), verbs in sorted(grouped.items())
    ]
