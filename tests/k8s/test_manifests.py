"""The pure manifest builders and status mapping: names, labels, strict schema validation."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import kubernetes_validate
import pytest

from control_plane.scheduler.k8s_errors import WorkloadSpecError
from control_plane.scheduler.k8s_manifests import (
    BACKEND_PERMISSIONS,
    backend_role_rules,
    container_env,
    deployment_manifest,
    label_value,
    service_manifest,
    workload_manifests,
    workload_name,
)
from control_plane.scheduler.k8s_status import observe_workload
from control_plane.scheduler.kubernetes import KubernetesBackend
from control_plane.scheduler.kubernetes_settings import KubernetesSettings
from control_plane.scheduler.protocol import Phase, Resources, WorkloadRole
from tests.k8s.conftest import (
    DEPLOYMENTS,
    SERVICES,
    Cluster,
    backend_settings,
    running,
    sampler_spec,
    served_model_spec,
    trainer_spec,
)

K8S_VERSION = "1.32.0"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

BARE = KubernetesSettings(namespace="wl", worker_secret_name="worker")
FULL = KubernetesSettings(
    namespace="wl",
    worker_secret_name="worker",
    image_pull_secrets=["regcred", "other"],
    node_selector={"pool": "gpu", "topology.kubernetes.io/zone": "eu-1a"},
    tolerations=[
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60},
    ],
    priority_class_name="high",
    service_account_name="openloops-worker",
)
GPU = Resources(gpus=8, gpu_type="NVIDIA-H100-80GB-HBM3", cpu="64", memory="512Gi", shm="64Gi")
CPU_ONLY = Resources(cpu="500m", memory="2Gi")
NONE = Resources()


def _specs():
    for role, make in (("trainer", trainer_spec), ("sampler", sampler_spec), ("served-model", served_model_spec)):
        for res_name, res in (("gpu", GPU), ("cpu", CPU_ONLY), ("no-resources", NONE)):
            for settings_name, settings in (("bare", BARE), ("full", FULL)):
                yield pytest.param(make(resources=res), settings, id=f"{role}-{res_name}-{settings_name}")
    yield pytest.param(trainer_spec(secret_env=[], session_id=None, replicas=0), BARE, id="trainer-no-secrets-scaled-0")
    yield pytest.param(served_model_spec(hf_secret="hf-token"), FULL, id="served-model-hf-secret")


def test_a_served_models_hf_secret_gives_its_server_hf_token() -> None:
    (dep, _svc) = workload_manifests(served_model_spec(hf_secret="team-hf", env={"HF_TOKEN": "plain"}), FULL)
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    hf = [e for e in env if e["name"] == "HF_TOKEN"]
    assert hf == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "team-hf", "key": "HF_TOKEN"}}}]


@pytest.mark.parametrize(("spec", "settings"), list(_specs()))
def test_generated_manifests_validate_strictly(spec, settings) -> None:
    docs = workload_manifests(spec, settings)
    assert [d["kind"] for d in docs] == (["Deployment"] if spec.port is None else ["Deployment", "Service"])
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        meta = doc["metadata"]
        assert DNS1035.match(meta["name"]) and len(meta["name"]) <= 63
        for value in meta["labels"].values():
            assert LABEL_VALUE.match(value) and len(value) <= 63, value
    dep = docs[0]
    pod = dep["spec"]["template"]["spec"]
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    if spec.resources.gpus:
        assert limits["nvidia.com/gpu"] == str(spec.resources.gpus)
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] == spec.resources.gpu_type
    else:
        assert "nvidia.com/gpu" not in limits
    assert ("imagePullSecrets" in pod) == bool(settings.image_pull_secrets)
    assert ("priorityClassName" in pod) == bool(settings.priority_class_name)
    assert ("tolerations" in pod) == bool(settings.tolerations or spec.resources.gpus)


def test_invalid_manifest_is_caught_by_the_validator() -> None:
    """The validator really checks (so the test above can fail)."""
    doc = deployment_manifest(sampler_spec(), BARE)
    doc["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


async def test_objects_sent_by_the_backend_validate_strictly(cluster: Cluster) -> None:
    """What actually reached the API server (after the client's own serialization)."""
    b = KubernetesBackend.from_settings(backend_settings(cluster.url))
    try:
        for spec in (trainer_spec(), sampler_spec(), served_model_spec(resources=CPU_ONLY)):
            await b.ensure(spec)
    finally:
        await b.close()
    objs = list(cluster.objects(DEPLOYMENTS).values()) + list(cluster.objects(SERVICES).values())
    assert len(objs) == 5
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --- names and labels -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "workload_id",
    ["run_01HZX3", "Run:A", "run-a", "smp:Alpha/Beta@1", "ÜNÏCÖDE", ":::", "x" * 300, "9starts-with-digit", ""],
)
@pytest.mark.parametrize("role", list(WorkloadRole))
def test_workload_names_are_dns1035_and_deterministic(workload_id: str, role: WorkloadRole) -> None:
    name = workload_name(workload_id, role)
    assert DNS1035.match(name) and len(name) <= 63
    assert name == workload_name(workload_id, role)


def test_workload_names_do_not_collide() -> None:
    ids = ["Run:A", "run-a", "run_a", "RUN-A", "run-a "]
    names = {workload_name(i, WorkloadRole.TRAINER) for i in ids}
    assert len(names) == len(ids)
    assert workload_name("x", WorkloadRole.TRAINER) != workload_name("x", WorkloadRole.SAMPLER)
    assert workload_name("run_01hzx", WorkloadRole.SAMPLER).startswith("ol-sampler-run-01hzx-")
    assert workload_name("a" * 200, WorkloadRole.SERVED_MODEL) != workload_name("a" * 201, WorkloadRole.SERVED_MODEL)


def test_label_values() -> None:
    assert label_value("org_ACME") == "org_ACME"  # valid: unchanged
    for raw in ("sess:42", "-x-", "a/b", "x" * 80, "ü", ""):
        v = label_value(raw)
        assert LABEL_VALUE.match(v) and len(v) <= 63, (raw, v)
    assert label_value("a:b") != label_value("a/b")  # sanitized forms stay distinct


# --- env and secrets ----------------------------------------------------------------------------


def test_secret_env_wins_over_plain_env_and_is_never_inlined() -> None:
    spec = sampler_spec(
        env={"AWS_ACCESS_KEY_ID": "leaked", "A": "1"}, secret_env=["AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"]
    )
    env = container_env(spec, BARE)
    assert env == [
        {"name": "A", "value": "1"},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "worker", "key": "AWS_ACCESS_KEY_ID"}}},
    ]
    assert "leaked" not in str(deployment_manifest(spec, BARE))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (sampler_spec(env={"BAD NAME": "x"}), "invalid environment variable name"),
        (sampler_spec(command=[]), "empty command"),
        (sampler_spec(port=70000), "invalid port"),
        (sampler_spec(replicas=-1), "replicas"),
    ],
)
def test_invalid_specs(spec, match: str) -> None:
    with pytest.raises(WorkloadSpecError, match=match):
        workload_manifests(spec, BARE)


def test_secret_env_needs_a_worker_secret() -> None:
    with pytest.raises(WorkloadSpecError, match="worker_secret_name"):
        deployment_manifest(sampler_spec(), KubernetesSettings())


def test_probes_and_settings_knobs() -> None:
    s = KubernetesSettings(
        worker_secret_name="w",
        startup_timeout_seconds=3600,
        gpu_type_label="cloud.google.com/gke-accelerator",
        gpu_resource_name="amd.com/gpu",
        tolerate_gpu_taint=False,
        cluster_domain="",
    )
    dep = deployment_manifest(sampler_spec(health_path="/ready"), s)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] == 3600
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["resources"]["limits"]["amd.com/gpu"] == "1"
    assert dep["spec"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "NVIDIA-H100-80GB-HBM3"
    }
    assert "tolerations" not in dep["spec"]["template"]["spec"]
    assert service_manifest(trainer_spec(), s, "uid") is None


def test_role_rules_cover_exactly_the_permissions() -> None:
    flat = {
        (g, r, v)
        for rule in backend_role_rules()
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert flat == set(BACKEND_PERMISSIONS)


# --- status mapping edge cases ------------------------------------------------------------------


def _dep(**spec):
    d = deployment_manifest(sampler_spec(), BARE)
    d["spec"].update(spec)
    return d


def _pod(status, **meta):
    return {"metadata": {"name": "p", **meta}, "status": status}


NOW = datetime.now(UTC)


def test_status_mapping_edge_cases() -> None:
    wid, role = "smp:Alpha-01", WorkloadRole.SAMPLER
    assert observe_workload(wid, role, None, []).phase == Phase.ABSENT
    deleting = _dep()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert observe_workload(wid, role, deleting, []).phase == Phase.ABSENT
    failure = _dep()
    failure["status"] = {
        "conditions": [
            {
                "type": "ReplicaFailure",
                "status": "True",
                "reason": "FailedCreate",
                "message": 'pods "x" is forbidden: exceeded quota: gpu',
            }
        ]
    }
    obs = observe_workload(wid, role, failure, [])
    assert (obs.phase, obs.reason) == (Phase.FAILED, 'FailedCreate: pods "x" is forbidden: exceeded quota: gpu')
    # a terminating pod does not count as running
    ready = running("sampler", ready=True, started=True)
    assert observe_workload(wid, role, _dep(), [_pod(ready, deletionTimestamp="x")]).phase == Phase.PENDING
    # not-ready after startup is UNHEALTHY only once it had been ready
    flapping = _pod(running("sampler", ready=False, started=True))
    assert observe_workload(wid, role, _dep(), [flapping], now=NOW).phase == Phase.STARTING
    assert observe_workload(wid, role, _dep(), [flapping], now=NOW, was_ready=lambda p: True).phase == Phase.UNHEALTHY
    # endpoint from the container port; none for a trainer
    obs = observe_workload(wid, role, _dep(), [_pod(ready)])
    assert obs.endpoint == f"http://{workload_name(wid, role)}.wl.svc.cluster.local:8000"
    tdep = deployment_manifest(trainer_spec(), BARE)
    assert observe_workload("run:Trainer-7", WorkloadRole.TRAINER, tdep, [_pod(ready)]).endpoint is None
