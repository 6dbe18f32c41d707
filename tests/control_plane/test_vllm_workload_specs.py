"""The vLLM workloads the controller hands to a backend: the shared sampler and a served model's
server share one builder; placement depends on the backend, limits on the settings."""

from __future__ import annotations

from types import SimpleNamespace

from control_plane.controller.served_model_spec import served_model_spec
from control_plane.controller.workloads import CHECKPOINT_KEY_PREFIX, SAMPLER_CLUSTER_PORT, sampler_spec
from control_plane.runtime import build_runtime
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.services.samplers import sampler_workload_id
from control_plane.settings import BackendKind
from data_plane.sampler.config import SamplerLaunch
from data_plane.sampler.names import adapter_name_for_prefix
from tests.control_plane.conftest import TEST_MODEL, make_settings


async def test_shared_sampler_limits_come_from_settings(services, data_dir) -> None:
    rt = build_runtime(
        make_settings(services, data_dir, sampler_max_lora_rank=128, sampler_max_loras=2, sampler_max_cpu_loras=5),
        with_backend=False,
    )
    try:
        spec = sampler_spec(rt, TEST_MODEL, port=18123)
        launch = SamplerLaunch.from_env(spec.env)
        assert spec.role == WorkloadRole.SAMPLER and spec.workload_id == sampler_workload_id(TEST_MODEL)
        assert (launch.max_lora_rank, launch.max_loras, launch.max_cpu_loras) == (128, 2, 5)
        assert launch.adapter_key_prefixes == [CHECKPOINT_KEY_PREFIX]
        assert (launch.host, launch.port, spec.port) == ("127.0.0.1", 18123, 18123)
        assert launch.adapter_cache_dir == str(data_dir / "sampler-cache" / spec.workload_id)
    finally:
        await rt.close()


async def test_served_model_serves_only_its_checkpoints_in_a_pod(services, data_dir) -> None:
    rt = build_runtime(make_settings(services, data_dir, backend=BackendKind.KUBERNETES), with_backend=False)
    try:
        sm = SimpleNamespace(id="sm-1", org_id="org-1", base_model=TEST_MODEL, hf_secret_name="hf-token")
        prefixes = ["checkpoints/org-1/run/sampler_weights/s1/v1", "checkpoints/org-1/run/sampler_weights/s2/v1"]
        adapters = [(adapter_name_for_prefix(prefixes[0]), 16), (adapter_name_for_prefix(prefixes[1]), 32)]
        spec = served_model_spec(rt, sm, adapters)  # type: ignore[arg-type]
        launch = SamplerLaunch.from_env(spec.env)
        assert spec.role == WorkloadRole.SERVED_MODEL and spec.org_id == "org-1" and spec.hf_secret == "hf-token"
        assert launch.adapter_key_prefixes == [name for name, _ in adapters]
        assert (launch.max_lora_rank, launch.max_loras) == (32, 2)  # the largest rank; all loaded at once
        assert (launch.host, launch.port) == ("0.0.0.0", SAMPLER_CLUSTER_PORT)
        assert launch.adapter_cache_dir == "/tmp/openloops-adapters"
    finally:
        await rt.close()
