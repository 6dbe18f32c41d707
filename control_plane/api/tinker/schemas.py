"""Request bodies of the Tinker service API (shapes from the tinker SDK's request types).
Unknown fields are ignored; ``type`` discriminators are accepted and not checked."""

from __future__ import annotations

from typing import Any

import msgspec


class ClientConfigBody(msgspec.Struct, kw_only=True):
    sdk_version: str | None = None


class CreateSessionBody(msgspec.Struct, kw_only=True):
    tags: list[str] = msgspec.field(default_factory=list)
    user_metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionIdBody(msgspec.Struct, kw_only=True):
    session_id: str


class FinishReason(msgspec.Struct, kw_only=True):
    type: str = "success"


class FinishSessionBody(msgspec.Struct, kw_only=True):
    reason: FinishReason = msgspec.field(default_factory=FinishReason)
    detail: str | None = None


class LoraConfigBody(msgspec.Struct, kw_only=True):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelBody(msgspec.Struct, kw_only=True):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfigBody | None = None
    optimizer_config: dict[str, Any] | None = None


class ModelIdBody(msgspec.Struct, kw_only=True):
    model_id: str


class OptimStepBody(msgspec.Struct, kw_only=True):
    model_id: str
    seq_id: int | None = None
    adam_params: dict[str, Any] | None = None
    optim_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsBody(msgspec.Struct, kw_only=True):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, Any] | None = None


class SaveWeightsForSamplerBody(msgspec.Struct, kw_only=True):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: int | None = None
    kind: str = "snapshot"
    seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, Any] | None = None


class LoadWeightsBody(msgspec.Struct, kw_only=True):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: dict[str, Any] | None = None
    weights_access_token: str | None = None


class RetrieveFutureBody(msgspec.Struct, kw_only=True):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoBody(msgspec.Struct, kw_only=True):
    tinker_path: str


class CheckpointTtlBody(msgspec.Struct, kw_only=True):
    ttl_seconds: int | None = None
