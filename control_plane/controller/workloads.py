"""Build WorkloadSpecs from rows and the catalog (the desired state handed to a backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_plane.db.models import Deployment
from control_plane.scheduler.ports import free_port
from control_plane.scheduler.protocol import Capacity, WorkloadRole, WorkloadSpec
from control_plane.services.samplers import sampler_workload_id
from control_plane.settings import BackendKind
from data_plane.sampler.config import SamplerLaunch
from data_plane.wire.worker_config import REDIS_URL_ENV, TrainerLaunch

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

STORE_SECRET_ENV = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]


def snapshot_prefix(org_id: str, run_id: str) -> str:
    """Where a run's trainer keeps its snapshots in the object store (docs/durability.md)."""
    return f"snapshots/{org_id}/{run_id}"


def trainer_spec(r: Runtime, dep: Deployment) -> WorkloadSpec:
    """The trainer worker of a deployment (it executes the deployment's runs one at a time), on
    the capacity of its ``availability_model`` (dedicated or spot)."""
    model = r.catalog.get(dep.base_model)
    # on Kubernetes the Redis URL (it may hold a password) reaches the worker from the worker
    # Secret, never as a plain value in the Deployment
    redis_from_secret = r.settings.backend == BackendKind.KUBERNETES
    launch = TrainerLaunch(
        deployment_id=dep.id,
        base_model=dep.base_model,
        model_source=model.source,
        redis_url="" if redis_from_secret else (r.settings.redis_url or ""),
        store=r.store_spec,
        max_seq_len=dep.max_seq_len,
        microbatch_tokens=r.settings.trainer_microbatch_tokens,
        logits_chunk_mib=r.settings.trainer_logits_chunk_mib,
        logits_full_max_mib=r.settings.trainer_logits_full_max_mib,
        activation_checkpointing=r.settings.trainer_activation_checkpointing,
        snapshot_interval_s=r.settings.trainer_snapshot_interval_seconds,
        snapshot_max_ops=r.settings.trainer_snapshot_max_ops,
    )
    return WorkloadSpec(
        workload_id=dep.id,
        role=WorkloadRole.TRAINER,
        org_id=dep.org_id,
        session_id=None,
        base_model=dep.base_model,
        command=["python", "-m", "data_plane.trainer"],
        env=launch.to_env(),
        secret_env=[
            *(STORE_SECRET_ENV if r.store_spec.kind == "s3" else []),
            *([REDIS_URL_ENV] if redis_from_secret else []),
        ],
        resources=model.resources.trainer.to_resources(),
        capacity=Capacity(dep.availability_model),
    )


# --- samplers: one shared vLLM server per base model ------------------------------------

SAMPLER_HEALTH_PATH = "/health"
SAMPLER_CLUSTER_PORT = 8000  # in a pod (Kubernetes): fixed, the Service targets it
# Checkpoint files live under this store prefix (control_plane.training.ops.storage_prefix): the
# sampler's resolver loads nothing outside it.
CHECKPOINT_KEY_PREFIX = "checkpoints/"


def vllm_spec(
    r: Runtime,
    *,
    workload_id: str,
    role: WorkloadRole,
    org_id: str,
    base_model: str,
    adapter_key_prefixes: list[str],
    max_lora_rank: int,
    max_loras: int,
    max_cpu_loras: int | None = None,
    port: int | None = None,
    hf_secret: str | None = None,
) -> WorkloadSpec:
    """A vLLM server (``python -m data_plane.sampler``) for ``base_model`` that loads adapters
    only from the object store under ``adapter_key_prefixes`` (never a client path).

    Locally it listens on 127.0.0.1 at ``port`` (a free port when not given: build the spec
    once per workload and keep it) with its adapter cache under the data dir; in a pod on
    0.0.0.0:8000 with a pod-local cache."""
    model = r.catalog.get(base_model)
    if r.settings.backend == BackendKind.LOCAL:
        host, port = "127.0.0.1", port or free_port()
        cache = str(r.settings.data_dir / "sampler-cache" / workload_id)
    else:
        host, port = "0.0.0.0", SAMPLER_CLUSTER_PORT
        cache = "/tmp/openloops-adapters"
    launch = SamplerLaunch(
        sampler_id=workload_id,
        model_source=model.source,
        served_model_name=model.name,
        store=r.store_spec,
        adapter_cache_dir=cache,
        host=host,
        port=port,
        max_model_len=model.max_context_length,
        max_lora_rank=max_lora_rank,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        adapter_key_prefixes=adapter_key_prefixes,
        extra_vllm_args=list(model.vllm_args),
    )
    return WorkloadSpec(
        workload_id=workload_id,
        role=role,
        org_id=org_id,
        session_id=None,
        base_model=model.name,
        command=["python", "-m", "data_plane.sampler"],
        env=launch.to_env(),
        secret_env=STORE_SECRET_ENV if r.store_spec.kind == "s3" else [],
        hf_secret=hf_secret,
        port=port,
        health_path=SAMPLER_HEALTH_PATH,
        resources=model.resources.sampler.to_resources(),
    )


def sampler_spec(r: Runtime, base_model: str, *, port: int | None = None) -> WorkloadSpec:
    """The shared vLLM sampler of ``base_model``: every org's adapters of that model, limits
    from the ``sampler_*`` settings (a model's catalog ``vllm_args`` can raise them)."""
    st = r.settings
    return vllm_spec(
        r,
        workload_id=sampler_workload_id(base_model),
        role=WorkloadRole.SAMPLER,
        org_id="shared",  # serves every org's adapters of this base model
        base_model=base_model,
        adapter_key_prefixes=[CHECKPOINT_KEY_PREFIX],
        max_lora_rank=st.sampler_max_lora_rank,
        max_loras=st.sampler_max_loras,
        max_cpu_loras=st.sampler_max_cpu_loras,
        port=port,
    )
