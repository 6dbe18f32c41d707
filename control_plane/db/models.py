"""SQLAlchemy models. The schema itself is created only by Alembic migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, list[str]: ARRAY(String)}


def _ts(**kw: Any) -> Any:
    return mapped_column(DateTime(timezone=True), **kw)


class Org(Base):
    __tablename__ = "orgs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = _ts(server_default=func.now())


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    __table_args__ = (UniqueConstraint("org_id", "email"),)


class ServiceAccount(Base):
    __tablename__ = "service_accounts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    __table_args__ = (UniqueConstraint("org_id", "name"),)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    service_account_id: Mapped[str | None] = mapped_column(ForeignKey("service_accounts.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(200))
    display_prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String))
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    last_used_at: Mapped[datetime | None] = _ts()
    revoked_at: Mapped[datetime | None] = _ts()
    __table_args__ = (
        CheckConstraint("(user_id IS NULL) <> (service_account_id IS NULL)", name="api_keys_one_owner"),
        Index("ix_api_keys_org_created", "org_id", "created_at", "id"),
    )


class TrainingProject(Base):
    __tablename__ = "training_projects"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    created_by: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    __table_args__ = (UniqueConstraint("org_id", "name"),)


class Session(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    created_by: Mapped[str] = mapped_column(String(40))
    training_project_id: Mapped[str | None] = mapped_column(ForeignKey("training_projects.id", ondelete="SET NULL"))
    origin: Mapped[str] = mapped_column(String(16))  # loops | tinker
    status: Mapped[str] = mapped_column(String(16))  # active | finished | expired
    tags: Mapped[list[str]] = mapped_column(ARRAY(String), default=list)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    display_name: Mapped[str | None] = mapped_column(String(200))
    sdk_version: Mapped[str | None] = mapped_column(String(40))
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    finish_detail: Mapped[str | None] = mapped_column(Text)
    last_heartbeat_at: Mapped[datetime | None] = _ts()
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    finished_at: Mapped[datetime | None] = _ts()
    __table_args__ = (
        Index("ix_sessions_org_created", "org_id", "created_at", "id"),
        Index("ix_sessions_org_creator_created", "org_id", "created_by", "created_at", "id"),
    )


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    created_by: Mapped[str] = mapped_column(String(40))
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    origin: Mapped[str] = mapped_column(String(16))  # loops | tinker
    model_seq_id: Mapped[int | None] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32))
    status_reason: Mapped[str | None] = mapped_column(Text)
    lora_rank: Mapped[int] = mapped_column(Integer)
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    max_seq_len: Mapped[int] = mapped_column(Integer)
    scale_down_delay_seconds: Mapped[int] = mapped_column(Integer)
    availability_model: Mapped[str] = mapped_column(String(16), default="dedicated")
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    init_path: Mapped[str | None] = mapped_column(Text)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    deployment_id: Mapped[str | None] = mapped_column(ForeignKey("deployments.id", ondelete="SET NULL"))
    base_checkpoint: Mapped[str | None] = mapped_column(Text)
    # auto | on | off: the run's choice (services/run_options.py); None: the server's default
    activation_checkpointing: Mapped[str | None] = mapped_column(String(8))
    # the adapter the run's paired sampler serves, and its version (optimizer steps at publish)
    policy_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    published_checkpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="SET NULL", use_alter=True)
    )
    last_request_at: Mapped[datetime | None] = _ts()
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    updated_at: Mapped[datetime] = _ts(server_default=func.now())
    deactivated_at: Mapped[datetime | None] = _ts()
    __table_args__ = (
        Index("ix_runs_org_created", "org_id", "created_at", "id"),
        Index("ix_runs_deployment", "deployment_id", "created_at"),
        Index("ix_runs_org_creator_created", "org_id", "created_by", "created_at", "id"),
        Index("ix_runs_org_base_model_created", "org_id", "base_model", "created_at", "id"),
        Index("ix_runs_org_creator_base_model_created", "org_id", "created_by", "base_model", "created_at", "id"),
        Index("ix_runs_session", "session_id", "created_at"),
        Index("ix_runs_status", "status"),
    )


class Sampler(Base):
    __tablename__ = "samplers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    created_by: Mapped[str] = mapped_column(String(40))
    session_id: Mapped[str | None] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    origin: Mapped[str] = mapped_column(String(16))  # loops | tinker
    base_model: Mapped[str] = mapped_column(String(200))
    model_path: Mapped[str | None] = mapped_column(Text)
    checkpoint_id: Mapped[str | None] = mapped_column(String(40))
    max_seq_length: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    status_reason: Mapped[str | None] = mapped_column(Text)
    endpoint: Mapped[str | None] = mapped_column(Text)
    scale_down_delay_seconds: Mapped[int] = mapped_column(Integer, default=3600, server_default="3600")
    last_request_at: Mapped[datetime | None] = _ts()
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    updated_at: Mapped[datetime] = _ts(server_default=func.now())
    __table_args__ = (
        Index("ix_samplers_org_created", "org_id", "created_at", "id"),
        Index("ix_samplers_org_creator_created", "org_id", "created_by", "created_at", "id"),
        Index("ix_samplers_run", "run_id"),
        Index("ix_samplers_status", "status"),
    )


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    created_by: Mapped[str] = mapped_column(String(40))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))  # weights | sampler_weights | external_weights
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(200))
    storage_prefix: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    lora_config: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    sync_status: Mapped[str] = mapped_column(String(16), default="COMPLETE")
    policy_version: Mapped[int | None] = mapped_column(Integer)  # optimizer steps when saved
    # published (Tinker ``publish``): other orgs may start from it by its path (load_weights,
    # create_training_client_from_state, base_checkpoint), never list, change or delete it
    public: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    expires_at: Mapped[datetime | None] = _ts()
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    __table_args__ = (
        UniqueConstraint("run_id", "kind", "name", name="uq_checkpoints_run_kind_name"),
        Index("ix_checkpoints_run_created", "run_id", "created_at", "id"),
        Index("ix_checkpoints_org_base_model_created", "org_id", "base_model", "created_at", "id"),
        Index("ix_checkpoints_org_creator_created", "org_id", "created_by", "created_at", "id"),
        Index(
            "ix_checkpoints_org_creator_base_model_created", "org_id", "created_by", "base_model", "created_at", "id"
        ),
        Index("ix_checkpoints_org_created", "org_id", "created_at", "id"),
    )


class CheckpointFile(Base):
    __tablename__ = "checkpoint_files"
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True)
    relative_path: Mapped[str] = mapped_column(Text, primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    node_rank: Mapped[int] = mapped_column(Integer, default=0)
    last_modified: Mapped[datetime] = _ts(server_default=func.now())


class Deployment(Base):
    """A Loops deployment: the dedicated trainer workload that runs execute on, one run at a
    time (``active_run_id``). A run made with ``reuse_from_run_id`` takes over its
    predecessor's deployment while it is live. Its status uses the shared vocabulary
    (:class:`control_plane.statuses.Status`); the API presents it in Loops' terms."""

    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    created_by: Mapped[str] = mapped_column(String(40))
    base_model: Mapped[str] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32))
    status_reason: Mapped[str | None] = mapped_column(Text)
    active_run_id: Mapped[str | None] = mapped_column(String(128))
    latest_run_id: Mapped[str | None] = mapped_column(String(128))
    availability_model: Mapped[str] = mapped_column(String(16), default="dedicated")
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    instance_type: Mapped[str | None] = mapped_column(String(100))
    node_count: Mapped[int] = mapped_column(Integer, default=1)
    max_seq_len: Mapped[int] = mapped_column(Integer)
    scale_down_delay_seconds: Mapped[int] = mapped_column(Integer)
    last_request_at: Mapped[datetime | None] = _ts()
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    updated_at: Mapped[datetime] = _ts(server_default=func.now())
    deactivated_at: Mapped[datetime | None] = _ts()
    __table_args__ = (
        Index("ix_deployments_org_created", "org_id", "created_at", "id"),
        Index("ix_deployments_status", "status"),
    )


class ServedModel(Base):
    """LoRA checkpoints of one base model served as an OpenAI-compatible model by a vLLM server
    of their own (``POST /v1/loops/checkpoints/deploy``); its checkpoints are
    :class:`ServedModelCheckpoint` rows."""

    __tablename__ = "served_models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    created_by: Mapped[str] = mapped_column(String(40))
    base_model: Mapped[str] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(200))  # Loops' model_name
    status: Mapped[str] = mapped_column(String(32))
    status_reason: Mapped[str | None] = mapped_column(Text)
    sampler_id: Mapped[str | None] = mapped_column(ForeignKey("samplers.id", ondelete="SET NULL"))
    scale_down_delay_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    endpoint: Mapped[str | None] = mapped_column(Text)  # its vLLM server, while it is up
    instance_type_id: Mapped[str | None] = mapped_column(String(100))
    hf_secret_name: Mapped[str | None] = mapped_column(String(253))
    # pending | ok | flagged (a checkpoint beyond the bound) | unverified (no probe) | error
    verification: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    verified_at: Mapped[datetime | None] = _ts()
    last_request_at: Mapped[datetime | None] = _ts()
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    updated_at: Mapped[datetime] = _ts(server_default=func.now())
    __table_args__ = (
        Index("ix_served_models_org_created", "org_id", "created_at", "id"),
        Index("ix_served_models_status", "status"),
    )


class ServedModelCheckpoint(Base):
    """One checkpoint of a served model: clients name it ``model_name`` (the checkpoint's name);
    vLLM loads it as ``adapter_name``. ``max_abs_delta``: the largest difference between the
    served prompt logprobs and the trainer's on the checkpoint's probe sequence."""

    __tablename__ = "served_model_checkpoints"
    served_model_id: Mapped[str] = mapped_column(ForeignKey("served_models.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(200))
    adapter_name: Mapped[str] = mapped_column(Text)
    max_abs_delta: Mapped[float | None] = mapped_column(Float)
    verify_detail: Mapped[str | None] = mapped_column(Text)
    verified_at: Mapped[datetime | None] = _ts()
    __table_args__ = (
        UniqueConstraint("served_model_id", "model_name", name="uq_served_model_checkpoints_name"),
        Index("ix_served_model_checkpoints_checkpoint", "checkpoint_id"),
    )


class RequestBucket(Base):
    """Per-minute request counters of a resource's serving route (``resource_type`` deployment
    or served_model): the source of the request series of its ``metrics``; ``run``: the sampling
    a run's samplers did (its ``sampling_metrics`` and usage)."""

    __tablename__ = "request_buckets"
    resource_type: Mapped[str] = mapped_column(String(16), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket_start: Mapped[datetime] = _ts(primary_key=True)
    count_2xx: Mapped[int] = mapped_column(Integer, default=0)
    count_4xx: Mapped[int] = mapped_column(Integer, default=0)
    count_5xx: Mapped[int] = mapped_column(Integer, default=0)
    max_concurrent: Mapped[int] = mapped_column(Integer, default=0)
    # latency histogram counts over LATENCY_BUCKETS_MS (+ overflow), for p50/p95/p99
    latency_hist: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    # what the sampling server reported for the minute's requests (0 where it reports nothing)
    samples: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class UsageSample(Base):
    """One observation of a workload replica's resource use (CPU, memory, disk, GPUs)."""

    __tablename__ = "usage_samples"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    resource_type: Mapped[str] = mapped_column(String(16))
    resource_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = _ts()
    replica: Mapped[str] = mapped_column(String(253))
    node: Mapped[str | None] = mapped_column(String(253))
    cpu_cores: Mapped[float | None] = mapped_column(Float)
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    ephemeral_bytes: Mapped[int | None] = mapped_column(BigInteger)
    ephemeral_capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # per GPU rank: {"0": {"memory_bytes": .., "utilization": ..}}
    gpus: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    __table_args__ = (Index("ix_usage_samples_resource_at", "resource_type", "resource_id", "at"),)


class StatusHistory(Base):
    __tablename__ = "status_history"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    resource_type: Mapped[str] = mapped_column(String(16))  # run | sampler | deployment | served_model
    resource_id: Mapped[str] = mapped_column(String(128))
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _ts(server_default=func.now())
    __table_args__ = (Index("ix_status_history_resource", "resource_type", "resource_id", "created_at", "id"),)


class TrainingMetric(Base):
    """The merged metrics of one optimizer step of a run (control_plane/telemetry/merge.py);
    ``seqs``: the ops merged into it (each counts once)."""

    __tablename__ = "training_metrics"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[str] = mapped_column(String(40))
    time: Mapped[datetime] = _ts()
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    seqs: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), default=list)
    __table_args__ = (Index("ix_training_metrics_time", "time"),)


class CapacityLimit(Base):
    """An org's ceiling on the GPUs of one type its live workloads hold
    (control_plane/services/capacity.py). ``operator_max_gpus`` is set by operators
    (``openloops admin capacity set``; unset: the installation default,
    ``OPENLOOPS_CAPACITY_DEFAULT_MAX_GPUS``); ``org_max_gpus`` by the org's admins
    (``PATCH /v1/training/capacity``), never above the operator's. The lower one applies."""

    __tablename__ = "capacity_limits"
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)
    gpu_type: Mapped[str] = mapped_column(String(100), primary_key=True)
    operator_max_gpus: Mapped[int | None] = mapped_column(Integer)
    org_max_gpus: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = _ts(server_default=func.now())
    __table_args__ = (
        CheckConstraint("operator_max_gpus IS NULL OR operator_max_gpus >= 0", name="ck_capacity_operator_max"),
        CheckConstraint("org_max_gpus IS NULL OR org_max_gpus >= 0", name="ck_capacity_org_max"),
    )
