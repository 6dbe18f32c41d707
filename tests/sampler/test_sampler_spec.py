"""sampler_spec: the shared vLLM workload of a base model, for both backends (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest

from control_plane.catalog import ModelCatalog
from control_plane.controller.workloads import CHECKPOINT_KEY_PREFIX, MULTI_NODE_SAMPLER_UNSUPPORTED, sampler_spec
from control_plane.errors import InvalidInput
from control_plane.runtime import build_runtime
from control_plane.scheduler.k8s_manifests import workload_manifests
from control_plane.scheduler.kubernetes_settings import KubernetesSettings
from control_plane.services.samplers import sampler_workload_id
from control_plane.settings import BackendKind
from data_plane.sampler.config import ENV_VAR, SamplerLaunch
from tests.control_plane.conftest import TEST_MODEL, make_settings
from tests.infra.services import TestServices


def _launch(spec) -> SamplerLaunch:
    return SamplerLaunch.from_json(spec.env[ENV_VAR])


async def test_local_and_kubernetes_specs(services: TestServices, data_dir: Path):
    local = build_runtime(make_settings(services, data_dir), with_backend=False)
    k8s = build_runtime(make_settings(services, data_dir, backend=BackendKind.KUBERNETES), with_backend=False)
    try:
        a = sampler_spec(local, TEST_MODEL)
        la = _launch(a)
        assert a.workload_id == sampler_workload_id(TEST_MODEL) and a.port == la.port and la.host == "127.0.0.1"
        assert la.served_model_name == TEST_MODEL and la.adapter_key_prefixes == [CHECKPOINT_KEY_PREFIX]
        assert la.adapter_cache_dir.startswith(str(data_dir))
        b = sampler_spec(k8s, TEST_MODEL)
        lb = _launch(b)
        assert (lb.host, lb.port, b.port) == ("0.0.0.0", 8000, 8000)
        docs = workload_manifests(b, KubernetesSettings(namespace="wl", worker_secret_name="worker"))
        assert [d["kind"] for d in docs] == ["Deployment", "Service"]
        for doc in docs:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)
        env = {e["name"]: e.get("value") for e in docs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert json.loads(env[ENV_VAR])["served_model_name"] == TEST_MODEL
        # distinct base models never share a workload id
        assert sampler_workload_id("org/a-b") != sampler_workload_id("org/a.b")
    finally:
        await local.close()
        await k8s.close()


async def test_a_multi_node_sampler_is_refused_with_the_reason(services: TestServices, data_dir: Path):
    """vLLM could span nodes without Ray, but not with adapters resolved into the leader pod's
    own directory: a catalog sampler with nodes > 1 is an InvalidInput naming why."""
    settings = make_settings(services, data_dir, backend=BackendKind.KUBERNETES)
    catalog = ModelCatalog.load(settings.model_catalog_path)
    model = catalog.get(TEST_MODEL)
    model.resources.sampler.nodes = 2
    model.resources.sampler.gpus = 8
    catalog.dump(settings.model_catalog_path)
    k8s = build_runtime(settings, with_backend=False)
    try:
        with pytest.raises(InvalidInput, match="asks for 2 sampler nodes") as err:
            sampler_spec(k8s, TEST_MODEL)
        assert err.value.field == "base_model"
        assert MULTI_NODE_SAMPLER_UNSUPPORTED in str(err.value)
        assert "LoRA adapters" in str(err.value)
    finally:
        await k8s.close()
