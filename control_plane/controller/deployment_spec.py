"""A deployment's workload: its own vLLM server, serving its checkpoint's adapter only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_plane.controller.workloads import (
    SAMPLER_CLUSTER_PORT,
    SAMPLER_HEALTH_PATH,
    SAMPLER_MAX_LORA_RANK,
    STORE_SECRET_ENV,
    _free_port,
)
from control_plane.db.models import Checkpoint, Deployment
from control_plane.scheduler.protocol import WorkloadRole, WorkloadSpec
from control_plane.settings import BackendKind
from data_plane.sampler.config import SamplerLaunch
from data_plane.sampler.names import adapter_name_for_prefix

if TYPE_CHECKING:
    from control_plane.runtime import Runtime


def deployment_spec(r: Runtime, dep: Deployment, ckpt: Checkpoint | None, *, port: int | None = None) -> WorkloadSpec:
    """A deployment's own vLLM server (``python -m data_plane.sampler``): the base model plus
    exactly one adapter, its checkpoint (``adapter_key_prefixes`` allows nothing else). Clients
    reach it through the API server, which names the adapter by
    ``adapter_name_for_prefix(ckpt.storage_prefix)``. Build it once per workload and keep it
    (a local server keeps its port)."""
    model = r.catalog.get(dep.base_model)
    local = r.settings.backend == BackendKind.LOCAL
    if local:
        host, port = "127.0.0.1", port or _free_port()
        cache = str(r.settings.data_dir / "sampler-cache" / dep.id)
    else:
        host, port = "0.0.0.0", SAMPLER_CLUSTER_PORT  # noqa: S104 (pod network)
        cache = "/tmp/openloops-adapters"  # noqa: S108 (pod-local)
    rank = int((ckpt.lora_config or {}).get("rank") or SAMPLER_MAX_LORA_RANK) if ckpt is not None else SAMPLER_MAX_LORA_RANK
    launch = SamplerLaunch(
        sampler_id=dep.id,
        model_source=model.source,
        served_model_name=model.name,
        store=r.store_spec,
        adapter_cache_dir=cache,
        host=host,
        port=port,
        max_model_len=model.max_context_length,
        max_lora_rank=rank,
        max_loras=1,
        adapter_key_prefixes=[adapter_name_for_prefix(ckpt.storage_prefix)] if ckpt is not None else [],
        extra_vllm_args=list(model.vllm_args),
    )
    return WorkloadSpec(
        workload_id=dep.id,
        role=WorkloadRole.DEPLOYMENT,
        org_id=dep.org_id,
        session_id=None,
        base_model=model.name,
        command=["python", "-m", "data_plane.sampler"],
        env=launch.to_env(),
        secret_env=STORE_SECRET_ENV if r.store_spec.kind == "s3" else [],
        port=port,
        health_path=SAMPLER_HEALTH_PATH,
        resources=model.resources.sampler.to_resources(),
    )
