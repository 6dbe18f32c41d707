"""Answer bodies of the Loops management API and its data plane (as the Loops SDK reads them:
seeds/loops-get-run-openapi.md, reference/loops-api.md). The presenters build them from rows;
the OpenAPI shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec


class Creator(msgspec.Struct):
    """Who created a resource: a user, a service account, or an id whose row is gone."""

    id: str
    email: str | None
    service_account: str | msgspec.UnsetType = msgspec.UNSET  # only for a service account


class StatusOut(msgspec.Struct):
    name: str
    reason: str | None


class LoopsSampler(msgspec.Struct):
    id: str
    base_url: str
    base_model: str
    created_at: datetime
    model_id: str
    deployment_id: str
    status: StatusOut
    user: Creator
    run_id: str | None
    session_id: str | None
    model_path: str | None
    node_count: int


class LoopsRun(msgspec.Struct):
    id: str
    session_id: str
    base_model: str
    base_url: str | None
    created_at: datetime
    sampler: LoopsSampler | None
    name: str
    user: Creator
    status: StatusOut
    deployment_id: str | None
    max_seq_len: int
    lora_rank: int
    seed: int | None
    scale_down_delay_seconds: int
    availability_model: str
    replicas: int
    base_checkpoint: str | None
    # openloops extension: the run's activation checkpointing mode (auto | on | off); null: it
    # chose none, its trainer uses the server's default
    activation_checkpointing: str | None


class LoopsCheckpoint(msgspec.Struct):
    id: str
    checkpoint_id: str
    checkpoint_type: str
    created_at: datetime
    base_model: str
    lora_adapter_config: dict[str, Any] | None
    size_bytes: int
    sync_status: str
    run_id: str
    target: str  # trainer | sampler
    checkpoint_path: str
    tinker_path: str


class LegacyCheckpoint(LoopsCheckpoint):
    trainer_id: str


class DeploymentStatus(msgspec.Struct):
    name: str  # in Loops' terms
    reason: str | None
    detail: str  # the status in openloops' vocabulary


class LoopsDeployment(msgspec.Struct):
    id: str
    base_model: str
    base_url: str
    status: DeploymentStatus
    active_run_id: str | None
    latest_run_id: str | None
    user: Creator
    created_at: datetime
    availability_model: str
    instance_type: str | None
    node_count: int
    replicas: int
    name: str | None


class DeactivatedUser(msgspec.Struct):
    email: str | None


class Deactivated(msgspec.Struct):
    id: str
    base_model: str
    user: DeactivatedUser


# --- envelopes ------------------------------------------------------------------------------
class SessionRef(msgspec.Struct):
    id: str


class SessionCreated(msgspec.Struct):
    session: SessionRef


class LoopsSession(msgspec.Struct):
    id: str
    status: str
    created_at: datetime


class SessionEnvelope(msgspec.Struct):
    session: LoopsSession


class RunEnvelope(msgspec.Struct):
    run: LoopsRun


class RunList(msgspec.Struct):
    runs: list[LoopsRun]


class SamplerEnvelope(msgspec.Struct):
    sampler: LoopsSampler


class SamplerList(msgspec.Struct):
    samplers: list[LoopsSampler]


class CheckpointList(msgspec.Struct):
    checkpoints: list[LoopsCheckpoint]


class CheckpointValid(msgspec.Struct):
    """An empty object: the checkpoint exists and can be loaded."""


class CheckpointFile(msgspec.Struct):
    url: str
    relative_file_name: str
    node_rank: int
    size_bytes: int
    last_modified: datetime


class CheckpointFiles(msgspec.Struct):
    presigned_urls: list[CheckpointFile]
    total_count: int
    next_page_token: int | None


class Source(msgspec.Struct):
    kind: str


class CheckpointSource(msgspec.Struct):
    source: Source


class LoopsModel(msgspec.Struct):
    model_name: str
    max_context_length: int
    supports_vision_language: bool
    trainable: bool
    sampleable: bool


class Capabilities(msgspec.Struct):
    supported_models: list[LoopsModel]


class DeploymentList(msgspec.Struct):
    deployments: list[LoopsDeployment]


class DeploymentEnvelope(msgspec.Struct):
    deployment: LoopsDeployment


class DeploymentMetrics(msgspec.Struct):
    deployment_id: str
    metrics: dict[str, Any]  # the ten series (control_plane/metering/series.py)


class LogLine(msgspec.Struct):
    timestamp: str  # nanoseconds since the epoch, as a string
    message: str
    replica: str
    request_id: str | None
    level: str


class DeploymentLogs(msgspec.Struct):
    logs: list[LogLine]


# --- trainer data plane -----------------------------------------------------------------------
class TrainerHealth(msgspec.Struct):
    status: str  # ok | starting
    run_id: str
    base_model: str
    detail: str | msgspec.UnsetType = msgspec.UNSET  # why it is not ready (503)


class PolicyVersion(msgspec.Struct):
    policy_version: int
    run_id: str


class OperationAccepted(msgspec.Struct):
    operation_id: str
    schema_version: int


class OperationDone(msgspec.Struct, tag_field="status", tag="done"):
    result: Any


class OperationFailed(msgspec.Struct, tag_field="status", tag="error"):
    error: str
    error_class: str  # UserError | ServerError


class OperationPending(msgspec.Struct, tag_field="status", tag="pending"):
    operation_id: str


# --- sampler data plane -----------------------------------------------------------------------
class ModelCard(msgspec.Struct):
    id: str
    object: str
    owned_by: str
    root: str
    parent: str | None


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelCard]


class SamplerPolicyVersion(msgspec.Struct):
    policy_version: int
    sampler_id: str


class WakeAccepted(msgspec.Struct):
    sampler_id: str
    status: str


class SamplerDeploymentStatus(msgspec.Struct):
    id: str
    model_id: str
    name: str
    status: str
    status_reason: str | None
    created_at: datetime
    is_production: bool


# --- legacy routes -------------------------------------------------------------------------------
class SamplingServer(msgspec.Struct):
    id: str
    base_url: str
    model_id: str
    deployment_id: str


class TrainerServer(msgspec.Struct):
    id: str
    base_url: str | None
    sampling_server: SamplingServer | None


class TrainerCreated(msgspec.Struct):
    trainer_server: TrainerServer


class SamplerCreated(msgspec.Struct):
    sampling_server: SamplingServer | None


class LegacyCheckpointList(msgspec.Struct):
    trainer_id: str
    checkpoints: list[LegacyCheckpoint]


class TrainerRef(msgspec.Struct):
    trainer_id: str
    session_id: str
    base_model: str


class TrainerSearch(msgspec.Struct):
    trainers: list[TrainerRef]


class CheckpointFound(msgspec.Struct):
    checkpoint: LegacyCheckpoint


# --- served models (an openloops extension: checkpoints served as OpenAI-compatible models) ---
class ServedCheckpoint(msgspec.Struct):
    checkpoint_id: str
    model: str  # what a client passes as ``model``: the checkpoint's name
    # verification against the trainer: the largest |served - trainer| prompt logprob on the
    # checkpoint's probe sequence (None until verified, or when it could not be)
    max_abs_delta: float | None
    verification: str | None  # ok | flagged | unverified | error, with the detail


class ServedModelOut(msgspec.Struct):
    id: str
    model_id: str  # Loops' name for it (the same id)
    deployment_id: str  # Loops' name for its one deployment (the same id)
    name: str | None  # the deploy's model_name
    base_model: str
    base_url: str  # the root of its OpenAI-compatible API: {base_url}/chat/completions, ...
    status: StatusOut
    checkpoints: list[ServedCheckpoint]
    verification: str  # pending | ok | flagged | unverified | error
    verified_at: datetime | None
    instance_type_id: str | None
    hf_secret_name: str | None
    scale_down_delay_seconds: int
    last_request_at: datetime | None
    user: Creator
    created_at: datetime


class ServedModelDeployed(msgspec.Struct):
    model_id: str
    deployment_id: str
    base_url: str
    served_model: ServedModelOut


class ServedModelEnvelope(msgspec.Struct):
    served_model: ServedModelOut


class ServedModelList(msgspec.Struct):
    served_models: list[ServedModelOut]
    next_page_token: str | None


class ServedModelMetrics(msgspec.Struct):
    deployment_id: str  # the served model's id, as Loops' deployment metrics name it
    metrics: dict[str, Any]  # the ten series (control_plane/metering/series.py)


class OpenAIModel(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    root: str
    parent: str | None


class OpenAIModelList(msgspec.Struct):
    object: str
    data: list[OpenAIModel]


class MetricsStep(msgspec.Struct):
    step: int
    time: datetime
    metrics: dict[str, Any]


class TrainingMetrics(msgspec.Struct):
    """A run's per-step training metrics (control_plane/telemetry/reads.py explains the range,
    the cursor and downsampling)."""

    steps: list[MetricsStep]
    next_cursor: str | None
    downsampled: bool


class SamplingMetrics(msgspec.Struct):
    """A run's sampling per step of the window (control_plane/metering/series.py: the four
    request series plus ``samples``, ``prompt_tokens``, ``completion_tokens``) and the window's
    ``totals`` (``requests``, ``errors``, ``samples``, ``prompt_tokens``, ``completion_tokens``)."""

    run_id: str
    start: datetime
    end: datetime
    step_seconds: int
    metrics: dict[str, Any]
    totals: dict[str, int]


class UsageReport(msgspec.Struct):
    """An org's usage (control_plane/metering/usage_report.py): ``items`` per run (``kind``
    run, samplers or served_model) or per ``day``, each with ``worker_seconds`` (by GPU type),
    ``worker_seconds_by_kind``, ``tokens_trained``, ``training_steps``, ``sampling`` and
    ``served`` (requests, errors, samples, prompt_tokens, completion_tokens); ``totals`` the
    same for the whole window."""

    org_id: str
    start: str
    end: str
    group_by: str
    items: list[dict[str, Any]]
    totals: dict[str, Any]


class TrainingGpuCapacity(msgspec.Struct):
    """One GPU type of an org's capacity (Loops' ``TrainingGpuCapacityItem``). ``limit`` -1:
    no ceiling; ``baseline`` equals ``limit`` (everything below it starts at once; 0 without
    one)."""

    gpu_type: str
    baseline: int
    limit: int
    usage_count: int
    dedicated_usage_count: int
    spot_usage_count: int


class TrainingCapacity(msgspec.Struct):
    """``GET /v1/training/capacity`` (Loops' ``GetTrainingGpuCapacityResponse``; no teams)."""

    gpu_capacities: list[TrainingGpuCapacity]


class TrainingCapacityPatched(msgspec.Struct):
    """``PATCH /v1/training/capacity``: the GPU type's capacity after the change."""

    gpu_capacity: TrainingGpuCapacity
