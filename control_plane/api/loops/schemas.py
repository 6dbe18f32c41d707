"""Request bodies of the Loops management API. Unknown fields are ignored."""

from __future__ import annotations

import msgspec


class CreateSessionBody(msgspec.Struct, kw_only=True):
    training_project_id: str | None = None


class CreateRunBody(msgspec.Struct, kw_only=True):
    session_id: str
    base_model: str
    name: str | None = None
    max_seq_len: int | None = None
    lora_rank: int = 64
    seed: int | None = None
    scale_down_delay_seconds: int | None = None
    availability_model: str = "dedicated"
    replicas: int = 1
    path: str | None = None
    reuse_from_run_id: str | None = None
    reuse_from_session_id: str | None = None


class CreateSamplerBody(msgspec.Struct, kw_only=True):
    session_id: str
    base_model: str | None = None
    run_id: str | None = None
    max_seq_length: int | None = None
    model_path: str | None = None
    reuse_from_session_id: str | None = None


class ValidateCheckpointBody(msgspec.Struct, kw_only=True):
    checkpoint_path: str


class MetricsBody(msgspec.Struct, kw_only=True):
    start_epoch_millis: int | None = None
    end_epoch_millis: int | None = None
    step_seconds: int | None = None
    time_divisor_seconds: int | None = None
