"""All configuration, loaded once at each process's entrypoint and passed down.

Every field can be set from the environment with the ``OPENLOOPS_`` prefix (nested fields use
``__``, e.g. ``OPENLOOPS_KUBERNETES__NAMESPACE``). Nothing else in the code reads environment
variables for configuration.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from control_plane.event_loop import LoopKind
from control_plane.scheduler.kubernetes_settings import KubernetesSettings


class BackendKind(StrEnum):
    LOCAL = "local"
    KUBERNETES = "kubernetes"


class StoreKind(StrEnum):
    LOCAL = "local"
    S3 = "s3"


def default_data_dir() -> Path:
    return Path.home() / ".openloops"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPENLOOPS_", env_nested_delimiter="__", extra="ignore")

    # --- serving -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    public_base_url: str | None = Field(None, description="Base URL clients use; defaults to http://{host}:{port}")
    data_dir: Path = Field(default_factory=default_data_dir)
    request_body_limit_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    checkpoint_import_limit_bytes: int = Field(
        4 * 1024**3, ge=1024, description="the largest adapter archive POST /v1/loops/checkpoints/import takes"
    )
    log_level: str = "info"
    log_json: bool = True
    access_log: bool = True
    event_loop: LoopKind = Field(
        "asyncio",
        description="the API process's event loop. asyncio: steady tail latency (with uvloop some connections "
        "went unread for 100-500 ms under 64-connection load, p99 20-200 ms vs 13-19 ms; README.md, Benchmarks); "
        "uvloop: about 5-10% more throughput on reads that query Postgres",
    )

    # --- state -------------------------------------------------------------------------
    database_url: str | None = Field(
        None, description="postgresql+asyncpg://...; unset in local mode = embedded PostgreSQL"
    )
    redis_url: str | None = Field(None, description="redis://...; unset in local mode = embedded Valkey")
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    db_read_pool_size: int = Field(10, ge=1, description="connections of the asyncpg pool behind the hottest reads")
    read_cache_seconds: float = Field(
        1.0,
        ge=0,
        lt=5.0,
        description="how long an API process may answer GET /v1/loops/runs/{id} and checkpoints?run_id= from "
        "memory; any write to the run, its samplers or checkpoints drops the entry at once (Postgres NOTIFY), so "
        "this only bounds staleness if notifications stop (0: always query)",
    )

    # --- object store ------------------------------------------------------------------
    store_kind: StoreKind = StoreKind.LOCAL
    store_root: Path | None = Field(None, description="local store directory; default {data_dir}/objects")
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_prefix: str = ""
    signing_secret: SecretStr | None = Field(
        None, description="HMAC key for download URLs served by the API (local store)"
    )
    download_url_ttl_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)

    # --- auth, limits, caches ----------------------------------------------------------
    key_cache_ttl_seconds: float = Field(
        30.0, gt=0, description="API-key cache TTL; revocations invalidate immediately"
    )
    key_local_cache_seconds: float = Field(
        0.5,
        ge=0,
        lt=1.0,
        description="how long one API process reuses a key lookup (and its leased rate-limit tokens) "
        "before asking Redis again; bounds how long a revoked key keeps working there (0: every request asks)",
    )
    rate_limit_per_second: float = Field(50.0, gt=0, description="sustained requests/s per key")
    rate_limit_burst: int = Field(200, ge=1, description="bucket size per key")
    rate_limit_enabled: bool = True
    auth_lookups_per_minute: int = Field(
        600,
        ge=1,
        description="database lookups of API keys unknown to the key cache, per client address and minute (a "
        "client with valid keys needs one per key per key_cache_ttl_seconds); past it the address gets 429",
    )
    last_seen_flush_seconds: float = Field(10.0, gt=0)

    # --- models and workers ------------------------------------------------------------
    model_catalog_path: Path | None = Field(
        None, description="YAML model catalog; default {data_dir}/models/catalog.yaml"
    )
    backend: BackendKind = BackendKind.LOCAL
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    worker_python: str | None = Field(
        None, description="python executable for local workers; default: this interpreter"
    )
    controller_interval_seconds: float = Field(1.0, gt=0)
    controller_lock_retry_seconds: float = Field(
        2.0, gt=0, description="how often a standby controller replica tries to become the leader"
    )
    backend_retry_attempts: int = Field(
        8, ge=1, description="transient backend failures before a workload that cannot be started is DEPLOY_FAILED"
    )
    backend_retry_max_seconds: float = Field(
        600.0, gt=0, description="... or after failing transiently for this long, whichever comes first"
    )
    backend_retry_base_delay_seconds: float = Field(1.0, ge=0, description="backoff after the first failure")
    backend_retry_max_delay_seconds: float = Field(60.0, ge=0, description="backoff cap")
    wake_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="how long a request waits for a scaled-to-zero sampler/deployment to wake up (then 503)",
    )
    session_expiry_seconds: float = Field(
        300.0, gt=0, description="Tinker sessions without a heartbeat for this long expire"
    )
    future_poll_timeout_seconds: float = Field(30.0, gt=0, le=40)
    tinker_fwdbwd_max_chunk_len: int = Field(
        1024, ge=1, description="most datums per forward_backward request the SDK sends (client/config)"
    )
    trainer_microbatch_tokens: int = Field(8192, ge=16)
    trainer_small_op_tokens: int = Field(
        128,
        ge=0,
        description="on a CPU trainer, a forward/forward_backward of at most this many tokens runs on one thread "
        "(its other threads would spin on the cores the API and the client need; 0: never)",
    )
    trainer_allocator: Literal["jemalloc", "system"] = Field(
        "jemalloc",
        description="how trainer processes allocate host memory: jemalloc (preloaded; lower peak memory and "
        "faster steps, measured in bench/README.md) or the C library's",
    )
    trainer_ranks: int = Field(
        1,
        ge=1,
        le=64,
        description="ranks (processes, under torchrun) of a trainer whose catalog entry has no GPUs: the base model "
        "is sharded across them with FSDP2 (a GPU trainer runs one rank per GPU)",
    )
    trainer_activation_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="trainers recompute decoder activations in the backward pass instead of keeping them: auto = "
        "for sequences of at least 4096 tokens. The default of runs that choose no mode of their own (Loops: "
        "activation_checkpointing; Tinker: user_metadata['openloops.activation_checkpointing'])",
    )
    trainer_logits_chunk_mib: int = Field(
        64,
        ge=0,
        description="trainers compute log-probabilities through the output projection this many MiB of float32 "
        "logits at a time when a micro-batch's whole logits exceed trainer_logits_full_max_mib; 0 = never",
    )
    trainer_logits_full_max_mib: int = Field(
        1024,
        ge=0,
        description="micro-batches whose whole float32 logits fit in this many MiB are computed in one piece (faster: "
        "chunking runs the output projection twice); 0 = always chunk",
    )
    trainer_snapshot_interval_seconds: float = Field(
        60.0,
        ge=0,
        description="a trainer snapshots its run (object store) this often while it executes ops; a crash replays "
        "the ops since (docs/durability.md)",
    )
    trainer_snapshot_max_ops: int = Field(
        64, ge=1, description="... or after this many ops, whichever comes first (bounds the op log in Redis)"
    )
    run_max_replicas: int = Field(
        8,
        ge=1,
        le=64,
        description="the most data-parallel replicas a Loops run may ask for (each is a full trainer: its GPUs, or "
        "trainer_ranks processes)",
    )
    run_resume_max_attempts: int = Field(
        3,
        ge=1,
        description="a run whose trainer dies this many times in a row without executing a new op is FAILED",
    )
    run_scale_down_delay_seconds: int = Field(
        3600,
        ge=1,
        description="runs made through the Tinker API scale to zero after this long without an op (Loops runs "
        "carry their own scale_down_delay_seconds)",
    )
    sampler_max_lora_rank: int = Field(
        64,
        ge=1,
        le=512,
        description="largest adapter rank a shared vLLM sampler accepts (covers the Loops 64 and Tinker 32 defaults)",
    )
    sampler_max_loras: int = Field(4, ge=1, description="adapters one vLLM batch can mix")
    sampler_max_cpu_loras: int = Field(
        32, ge=1, description="adapters a shared sampler keeps loaded (LRU); evicted ones reload from its disk cache"
    )
    sampler_max_in_flight: int = Field(
        256,
        ge=1,
        description="sampling requests one API process keeps in flight per vLLM server; beyond it 429 (the SDK backs off)",
    )
    default_scale_down_delay_seconds: int = Field(3600, ge=1)
    served_model_verify_max_delta: float = Field(
        0.1,
        gt=0,
        description="largest |served - trainer| prompt logprob on a checkpoint's probe before a served model is "
        "flagged (CPU fp32 agrees to ~1e-5; bf16 GPU kernels differ by a few hundredths)",
    )

    # --- capacity and guard rails (docs/loops.md, "Capacity and limits") ---------------
    capacity_default_max_gpus: dict[str, int] = Field(
        default_factory=dict,
        description="installation-wide ceiling per GPU type on what one org's live trainers, samplers and served "
        'models hold, as JSON ({"NVIDIA-H100-80GB-HBM3": 16, "cpu": 8}; "*" = every type not named); a type '
        "without one has no ceiling. `openloops admin capacity set` overrides it per org",
    )
    capacity_retry_after_seconds: int = Field(
        10, ge=1, le=60, description="the Retry-After of a 429 loops_capacity refusal (both SDKs honour up to 60 s)"
    )
    max_active_sessions_per_org: int = Field(
        1000, ge=1, description="active (unfinished) sessions an org may hold; one more is refused with 429"
    )
    max_active_runs_per_org: int = Field(
        1000, ge=1, description="runs (training models) of an org that have not ended; one more is refused with 429"
    )
    max_inflight_futures_per_org: int = Field(
        10000,
        ge=1,
        description="training ops and Tinker samples of an org submitted and not yet answered; one more is refused "
        "with 429 (the SDKs back off and resubmit)",
    )
    control_body_limit_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="request body limit of the routes that create or change resources (sessions, runs, samplers, "
        "served models, keys, capacity); the op and sampling routes take request_body_limit_bytes",
    )

    # --- metering ----------------------------------------------------------------------
    metrics_flush_seconds: float = Field(
        5.0,
        gt=0,
        description="how often an API process adds its request counters (per resource and minute) to Postgres",
    )
    usage_sample_seconds: float = Field(
        15.0, gt=0, description="how often the controller samples trainer CPU/memory/GPU use"
    )
    usage_retention_hours: float = Field(168.0, gt=0, description="resource samples older than this are deleted")

    # --- training telemetry (control_plane/telemetry/) ---------------------------------
    training_metrics_retention_days: float = Field(
        90.0, ge=0, description="per-step training metrics older than this are deleted by the controller (0: kept)"
    )
    telemetry_batch_size: int = Field(
        500, ge=1, le=10000, description="telemetry entries an API process writes to Postgres in one transaction"
    )
    telemetry_batch_ms: int = Field(
        500, ge=1, le=60000, description="how long an API process gathers telemetry entries before it writes them"
    )

    # --- local mode --------------------------------------------------------------------
    dev_org_name: str = "dev"
    dev_user_email: str = "dev@localhost"

    @field_validator("capacity_default_max_gpus")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(k for k, n in v.items() if n < 0 or not k)
        if bad:
            raise ValueError(f"capacity_default_max_gpus: negative ceiling or empty GPU type: {bad}")
        return v

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else v

    @property
    def base_url(self) -> str:
        return self.public_base_url or f"http://{self.host}:{self.port}"

    @property
    def resolved_store_root(self) -> Path:
        return self.store_root or self.data_dir / "objects"

    @property
    def resolved_catalog_path(self) -> Path:
        return self.model_catalog_path or self.data_dir / "models" / "catalog.yaml"
