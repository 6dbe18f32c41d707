"""Build WorkloadSpecs from rows and the catalog (the desired state handed to a backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_plane.controller.allocator import trainer_allocator_env
from control_plane.db.models import Deployment
from control_plane.errors import InvalidInput
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


# torchrun's rendezvous port on a multi-node group's leader pod
TORCHRUN_PORT = 29500


def trainer_command(ranks_per_node: int, nodes: int) -> list[str]:
    """How a trainer starts: one process, or torchrun with ``ranks_per_node`` ranks on each of
    ``nodes`` pods (the ranks after the first follow rank 0, which alone talks to Redis). A
    multi-node group meets at its leader: the LeaderWorkerSet controller sets
    ``LWS_LEADER_ADDRESS`` and ``LWS_WORKER_INDEX`` in every pod, and Kubernetes expands the
    ``$(VAR)`` references. ``--max-restarts=0``: a dead rank ends the group, and the controller
    restarts it (the run resumes from its snapshot, docs/durability.md)."""
    if ranks_per_node == 1 and nodes == 1:
        return ["python", "-m", "data_plane.trainer"]
    cmd = ["python", "-m", "torch.distributed.run", f"--nproc-per-node={ranks_per_node}", f"--nnodes={nodes}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            "--node-rank=$(LWS_WORKER_INDEX)",
            "--master-addr=$(LWS_LEADER_ADDRESS)",
            f"--master-port={TORCHRUN_PORT}",
        ]
    return [*cmd, "--max-restarts=0", "-m", "data_plane.trainer"]


def trainer_spec(r: Runtime, dep: Deployment) -> WorkloadSpec:
    """The trainer worker of a deployment (it executes the deployment's runs one at a time), on
    the capacity of its ``availability_model`` (dedicated or spot).

    Ranks: one per GPU of the catalog entry's trainer (per node), or ``trainer_ranks`` without
    GPUs; the base model is sharded across a replica's ranks. ``replicas`` (Loops) multiplies
    them: each replica is a full set of the entry's nodes. On Kubernetes every replica-node is
    a pod (a group of several is a LeaderWorkerSet); locally all ranks run under one torchrun."""
    model = r.catalog.get(dep.base_model)
    res = model.resources.trainer
    ranks = res.gpus if res.gpus > 0 else r.settings.trainer_ranks
    replicas = max(1, dep.replicas or 1)  # a row not yet flushed has no default filled in
    if r.settings.backend == BackendKind.LOCAL:
        if res.nodes > 1:
            raise InvalidInput(
                f"base model {dep.base_model!r} needs {res.nodes} trainer nodes; local mode runs single-node "
                "trainers only",
                field="base_model",
            )
        ranks_per_node, nodes = ranks * replicas, 1
    else:
        ranks_per_node, nodes = ranks, res.nodes * replicas
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
        small_op_tokens=r.settings.trainer_small_op_tokens,
        logits_chunk_mib=r.settings.trainer_logits_chunk_mib,
        logits_full_max_mib=r.settings.trainer_logits_full_max_mib,
        activation_checkpointing=r.settings.trainer_activation_checkpointing,
        snapshot_interval_s=r.settings.trainer_snapshot_interval_seconds,
        snapshot_max_ops=r.settings.trainer_snapshot_max_ops,
        replicas=replicas,
    )
    return WorkloadSpec(
        workload_id=dep.id,
        role=WorkloadRole.TRAINER,
        org_id=dep.org_id,
        session_id=None,
        base_model=dep.base_model,
        command=trainer_command(ranks_per_node, nodes),
        env={**launch.to_env(), **trainer_allocator_env(r.settings.trainer_allocator, r.settings.backend)},
        secret_env=[
            *(STORE_SECRET_ENV if r.store_spec.kind == "s3" else []),
            *([REDIS_URL_ENV] if redis_from_secret else []),
        ],
        resources=res.to_resources(),
        nodes=nodes,
        capacity=Capacity(dep.availability_model),
    )


# --- samplers: one shared vLLM server per base model ------------------------------------

SAMPLER_HEALTH_PATH = "/health"
SAMPLER_CLUSTER_PORT = 8000  # in a pod (Kubernetes): fixed, the Service targets it
# Checkpoint files live under this store prefix (control_plane.training.ops.storage_prefix): the
# sampler's resolver loads nothing outside it.
CHECKPOINT_KEY_PREFIX = "checkpoints/"

# Why a vLLM server runs on one node only (a catalog entry's ``sampler.nodes`` must be 1). vLLM
# itself can span nodes without Ray (the multiprocessing executor: ``--nnodes``, ``--node-rank``,
# ``--master-addr``, ``--master-port``; the other nodes run ``vllm serve --headless``), but:
# * the LoRA resolver (data_plane.sampler.resolver) runs in the leader's API server and downloads
#   each adapter into a directory of that pod; vLLM's workers on the other nodes load the adapter
#   from that same path on their own filesystem, where it is not;
# * the sampler launcher execs vLLM's API-server entry point, which has no headless mode.
MULTI_NODE_SAMPLER_UNSUPPORTED = (
    "a vLLM server of openloops runs on one node: across nodes, vLLM's workers on the other nodes "
    "would load LoRA adapters from a directory that only the leader pod has (the object-store "
    "resolver downloads them there), and the sampler launcher has no headless worker mode; "
    "use sampler nodes: 1 (tensor parallelism within one node)"
)


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
    0.0.0.0:8000 with a pod-local cache. A catalog entry whose sampler asks for several nodes is
    refused (:data:`MULTI_NODE_SAMPLER_UNSUPPORTED`)."""
    model = r.catalog.get(base_model)
    if model.resources.sampler.nodes > 1:
        raise InvalidInput(
            f"base model {base_model!r} asks for {model.resources.sampler.nodes} sampler nodes: "
            f"{MULTI_NODE_SAMPLER_UNSUPPORTED}",
            field="base_model",
        )
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
