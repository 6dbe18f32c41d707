"""Answer bodies of the Tinker service API (the tinker SDK's response types)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class ClientConfig(msgspec.Struct):
    """Server-driven client flags (wire protocol 1.6)."""

    pjwt_auth_enabled: bool
    use_pyqwest_transport: bool
    # SDKs 0.20-0.24 send forward_backward as protobuf only when told to (proto_write_fwdbwd),
    # 0.22.3-0.24 likewise forward (fwd_via_fwdbwd); 0.25 on always do and ignore both
    proto_write_fwdbwd: bool
    fwd_via_fwdbwd: bool
    proto_compress_fwdbwd: bool
    parallel_fwdbwd_chunks: bool
    sample_use_retrieve_futures: bool
    custom_loss_server_side: bool
    sample_join_sampling_session: bool
    fwdbwd_max_chunk_len: int


class DynamicConfig(msgspec.Struct):
    refresh_interval_sec: int
    sample_cancel_enabled: bool
    sample_cancel_max_batch_size: int


class Accepted(msgspec.Struct):
    status: str  # accepted


class Healthy(msgspec.Struct):
    status: str  # ok


class SupportedModel(msgspec.Struct):
    model_name: str
    max_context_length: int
    trainable: bool
    sampleable: bool


class ServerCapabilities(msgspec.Struct):
    supported_models: list[SupportedModel]


class SessionCreated(msgspec.Struct):
    session_id: str
    type: Literal["create_session"] = "create_session"


class HeartbeatAck(msgspec.Struct):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionFinished(msgspec.Struct):
    session_id: str
    status: str
    reason: str | None


class SessionList(msgspec.Struct):
    sessions: list[str]


class TinkerSession(msgspec.Struct):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, Any]
    display_name: str | None
    status: str


class ProjectSet(msgspec.Struct):
    session_id: str
    project_id: str


class FutureRef(msgspec.Struct):
    """A submitted op: poll ``retrieve_future`` with ``request_id``."""

    request_id: str
    model_id: str


class ModelData(msgspec.Struct):
    model_name: str
    tokenizer_id: str


class OptimizerConfig(msgspec.Struct):
    type: str  # adamw


class ModelInfo(msgspec.Struct):
    model_id: str
    model_data: ModelData
    optimizer_config: OptimizerConfig
    is_lora: bool
    lora_rank: int
    model_name: str
    type: Literal["get_info"] = "get_info"


class TryAgain(msgspec.Struct):
    """The future is still pending: poll again."""

    request_id: str
    queue_state: str
    type: Literal["try_again"] = "try_again"


class FutureFailed(msgspec.Struct):
    """The op failed (``category`` user: the request was at fault)."""

    error: str
    category: str  # user | server


class Checkpoint(msgspec.Struct):
    checkpoint_id: str
    checkpoint_type: str  # training | sampler
    time: str  # ISO 8601
    tinker_path: str
    size_bytes: int
    public: bool
    user_metadata: dict[str, str] | None
    expires_at: str | None


class TrainingRun(msgspec.Struct):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool
    lora_rank: int
    last_request_time: str
    last_checkpoint: Checkpoint | None
    last_sampler_checkpoint: Checkpoint | None
    user_metadata: dict[str, str]
    # openloops extensions (ignored by the SDK)
    status: str
    session_id: str


class Cursor(msgspec.Struct):
    offset: int
    limit: int
    total_count: int


class TrainingRunList(msgspec.Struct):
    training_runs: list[TrainingRun]
    cursor: Cursor


class CheckpointList(msgspec.Struct):
    checkpoints: list[Checkpoint]


class CheckpointPage(msgspec.Struct):
    checkpoints: list[Checkpoint]
    cursor: Cursor


class CheckpointDeleted(msgspec.Struct):
    deleted: str  # the tinker path
    files_removed: int


class ExternalWeightsUrls(msgspec.Struct):
    """Signed download URLs of a checkpoint's files, keyed by path relative to the checkpoint."""

    urls: dict[str, str]
    expires: str  # ISO 8601: when the URLs stop working


class WeightsInfo(msgspec.Struct):
    base_model: str
    optimizer_config: OptimizerConfig
    is_lora: bool
    lora_rank: int | None
    train_unembed: bool | None
    train_mlp: bool | None
    train_attn: bool | None


class SamplingSessionCreated(msgspec.Struct):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"


class SamplerInfo(msgspec.Struct):
    sampler_id: str
    base_model: str
    model_path: str | None


class SampleSubmitted(msgspec.Struct):
    request_id: str
    sample_sequence_ids: list[str]
