"""Spot capacity on Kubernetes: the manifest of a spot trainer (the ``spot_*`` settings merged
into its placement), and a Loops run created with ``availability_model: "spot"`` through the API
whose trainer Deployment the real controller creates on the kmock cluster."""

from __future__ import annotations

from typing import Any

import httpx
import kubernetes_validate
import pytest
from structlog.testing import capture_logs

from control_plane.api.app import create_app
from control_plane.controller.reconciler import Controller
from control_plane.runtime import Runtime
from control_plane.scheduler.k8s_manifests import deployment_manifest, workload_name
from control_plane.scheduler.kubernetes_settings import KubernetesSettings
from control_plane.scheduler.protocol import Capacity, WorkloadRole
from tests.control_plane.conftest import TEST_MODEL, Tenant
from tests.k8s.conftest import DEPLOYMENTS, Cluster, sampler_spec, served_model_spec, trainer_spec
from tests.k8s.controller_env import k8s_runtime, k8s_settings, tenant

K8S_VERSION = "1.32.0"
GPU_LABEL = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}  # tests.k8s.conftest.trainer_spec's GPU
GPU_TOL = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
ML_TOL = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
GKE_SPOT_TOL = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
SPOT = KubernetesSettings(
    namespace="wl",
    worker_secret_name="worker",
    node_selector={"node-pool": "gpu", "topology.kubernetes.io/zone": "eu-1a"},
    tolerations=[ML_TOL],
    spot_node_selector={"node-pool": "gpu-spot", "cloud.google.com/gke-spot": "true"},
    spot_tolerations=[GKE_SPOT_TOL, ML_TOL],  # ML_TOL again: not repeated in the pod
)


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


# --- manifests ----------------------------------------------------------------------------------


def test_a_spot_trainer_gets_the_spot_selector_and_tolerations() -> None:
    dep = deployment_manifest(trainer_spec(capacity=Capacity.SPOT), SPOT)
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    pod = pod_spec(dep)
    # merged with the general selector; the spot node-pool wins
    assert pod["nodeSelector"] == {
        "node-pool": "gpu-spot",
        "topology.kubernetes.io/zone": "eu-1a",
        "cloud.google.com/gke-spot": "true",
        **GPU_LABEL,
    }
    assert pod["tolerations"] == [ML_TOL, GKE_SPOT_TOL, GPU_TOL]
    assert pod["terminationGracePeriodSeconds"] == 120


def test_a_dedicated_trainer_gets_no_spot_placement() -> None:
    dep = deployment_manifest(trainer_spec(), SPOT)
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    pod = pod_spec(dep)
    assert pod["nodeSelector"] == {"node-pool": "gpu", "topology.kubernetes.io/zone": "eu-1a", **GPU_LABEL}
    assert pod["tolerations"] == [ML_TOL, GPU_TOL]


def test_without_spot_settings_a_spot_trainer_is_placed_like_a_dedicated_one() -> None:
    plain = SPOT.model_copy(update={"spot_node_selector": {}, "spot_tolerations": []})
    assert not plain.spot_configured and SPOT.spot_configured
    spot = deployment_manifest(trainer_spec(capacity=Capacity.SPOT), plain)
    assert spot == deployment_manifest(trainer_spec(), plain)


def test_trainers_have_their_own_termination_grace_period() -> None:
    s = KubernetesSettings(
        worker_secret_name="w", termination_grace_period_seconds=30, trainer_termination_grace_period_seconds=600
    )
    assert pod_spec(deployment_manifest(trainer_spec(), s))["terminationGracePeriodSeconds"] == 600
    for spec in (sampler_spec(), served_model_spec()):
        assert pod_spec(deployment_manifest(spec, s))["terminationGracePeriodSeconds"] == 30


# --- through the Loops API and the controller -------------------------------------------------


async def create_runs(rt: Runtime, t: Tenant, *availability: str) -> list[dict[str, Any]]:
    """POST /v1/loops/runs once per availability model, each in a new session."""
    runs = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(rt)), base_url="http://testserver", headers=t.headers
    ) as c:
        for model in availability:
            sid = (await c.post("/v1/loops/sessions", json={})).json()["session"]["id"]
            body = {"session_id": sid, "base_model": TEST_MODEL, "availability_model": model}
            r = await c.post("/v1/loops/runs", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["run"]["availability_model"] == model
            runs.append(r.json()["run"])
    return runs


def trainer_pod(cluster: Cluster, run: dict[str, Any]) -> dict[str, Any]:
    dep = cluster.get(DEPLOYMENTS, workload_name(run["deployment_id"], WorkloadRole.TRAINER))
    assert dep is not None, run["deployment_id"]
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    return pod_spec(dep)


@pytest.mark.usefixtures("clean_state")
async def test_a_spot_run_puts_its_trainer_on_spot_nodes(services, data_dir, cluster: Cluster) -> None:
    kube = dict(spot_node_selector={"cloud.google.com/gke-spot": "true"}, spot_tolerations=[GKE_SPOT_TOL])
    settings = k8s_settings(services, data_dir, cluster.url, kube=kube)
    general = settings.kubernetes.node_selector
    async with k8s_runtime(settings) as rt:
        spot, dedicated = await create_runs(rt, await tenant(rt), "spot", "dedicated")
        assert spot["deployment_id"] != dedicated["deployment_id"]  # a spot run never shares a trainer
        with capture_logs() as logs:
            await Controller(rt).reconcile_once()
    pod = trainer_pod(cluster, spot)
    assert pod["nodeSelector"] == {**general, "cloud.google.com/gke-spot": "true"}
    assert GKE_SPOT_TOL in pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] == 120
    pod = trainer_pod(cluster, dedicated)
    assert pod["nodeSelector"] == general
    assert GKE_SPOT_TOL not in pod.get("tolerations", [])
    assert not [e for e in logs if "spot" in e["event"]]


@pytest.mark.usefixtures("clean_state")
async def test_spot_runs_without_spot_settings_run_as_dedicated_with_one_warning(
    services, data_dir, cluster: Cluster
) -> None:
    settings = k8s_settings(services, data_dir, cluster.url)
    assert not settings.kubernetes.spot_configured
    async with k8s_runtime(settings) as rt:
        runs = await create_runs(rt, await tenant(rt), "spot", "spot", "dedicated")
        with capture_logs() as logs:
            ctl = Controller(rt)
            await ctl.reconcile_once()
            await ctl.reconcile_once()
    pods = [trainer_pod(cluster, run) for run in runs]
    assert pods[0]["nodeSelector"] == pods[1]["nodeSelector"] == pods[2]["nodeSelector"]
    assert pods[0]["tolerations"] == pods[2]["tolerations"]
    warnings = [e for e in logs if e["log_level"] == "warning" and "spot" in e["event"]]
    assert len(warnings) == 1, warnings
    assert warnings[0]["workload_id"] in {runs[0]["deployment_id"], runs[1]["deployment_id"]}
