"""How a scheduler backend tells a trainer worker what to run.

Serialized as JSON into the ``OPENLOOPS_WORKER_CONFIG`` environment variable of the worker
process/pod. Secrets (S3 credentials, Redis passwords inside URLs on Kubernetes) reach the
worker through their own environment variables, never through this document.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

ENV_VAR = "OPENLOOPS_WORKER_CONFIG"
# When ``TrainerLaunch.redis_url`` is empty the worker reads the URL from this variable (set
# from a Secret on Kubernetes, since the URL may carry a password).
REDIS_URL_ENV = "OPENLOOPS_REDIS_URL"


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Object store location. ``kind`` is ``local`` (``root`` is a directory) or ``s3``."""

    kind: str = "local"
    root: str | None = None
    bucket: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class TrainerLaunch:
    """The trainer worker of one deployment: which runs it executes arrives through Redis
    (:func:`data_plane.wire.queue.deployment_runs_stream`)."""

    deployment_id: str
    base_model: str
    model_source: str  # local directory with config.json + weights + tokenizer (or an HF id)
    redis_url: str  # "" = read it from the REDIS_URL_ENV environment variable
    store: StoreSpec = field(default_factory=StoreSpec)
    max_seq_len: int = 2048  # the longest sequence any run on this deployment may use
    microbatch_tokens: int = 8192
    # log-probabilities through the output projection this many MiB of float32 logits at a time
    # (data_plane.trainer.chunked_head); 0 = the whole [tokens, vocab] logits at once
    logits_chunk_mib: int = 64
    # ... when a micro-batch's whole logits would exceed this many MiB (else one piece: faster)
    logits_full_max_mib: int = 1024
    # recompute decoder activations in the backward pass: auto (sequences of >= 4096 tokens)
    # | on | off (data_plane.trainer.activation_checkpointing)
    activation_checkpointing: str = "auto"
    # on a CPU, a forward/forward_backward of at most this many tokens runs on one thread
    # (data_plane.trainer.cpu_threads); 0 = every op on all of the process's threads
    small_op_tokens: int = 128
    device: str = "auto"  # auto | cpu | cuda
    # data-parallel copies among the torchrun ranks (each takes a share of every batch; the
    # ranks of one copy shard the base model between them): WORLD_SIZE / replicas ranks each
    replicas: int = 1
    # a run snapshot is due after this many executed ops, or this many seconds with at least one
    # (data_plane.trainer.snapshotter); the op log in Redis holds at most about that much
    snapshot_interval_s: float = 60.0
    snapshot_max_ops: int = 64

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> TrainerLaunch:
        env = os.environ if environ is None else environ
        d = json.loads(env[ENV_VAR])
        d["store"] = StoreSpec(**d.get("store", {}))
        if not d.get("redis_url"):
            d["redis_url"] = env.get(REDIS_URL_ENV, "")
            if not d["redis_url"]:
                raise ValueError(f"no Redis URL: the worker config has none and {REDIS_URL_ENV} is unset")
        return cls(**d)
