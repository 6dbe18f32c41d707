"""Request bodies of the Loops management API, with their limits
(:mod:`control_plane.fields`). Unknown fields are ignored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from control_plane.errors import InvalidInput
from control_plane.fields import (
    INT32_MAX,
    LOOPS_SAMPLER_CHECKPOINT_PATH,
    CheckpointPathOrEmpty,
    Int64,
    ModelName,
    PosInt32,
    ProjectId,
    RunId,
    RunName,
    SessionId,
    Text,
)
from control_plane.metering import series
from control_plane.services.runs import MAX_LORA_RANK

LoraRank = Annotated[int, msgspec.Meta(ge=1, le=MAX_LORA_RANK)]
ScaleDownDelay = Annotated[int, msgspec.Meta(ge=1, le=3600)]
Replicas = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=64,
        description="data-parallel trainer replicas: each runs a share of every batch (at most the server's "
        "run_max_replicas)",
    ),
]
AvailabilityModel = Literal["dedicated", "spot"]
ActivationCheckpointing = Annotated[
    Literal["auto", "on", "off"],
    msgspec.Meta(
        description="openloops extension: recompute decoder activations in the backward pass: auto (micro-batches "
        "whose longest sequence has 4096+ tokens), on, off. Omitted: the server's default "
        "(OPENLOOPS_TRAINER_ACTIVATION_CHECKPOINTING)"
    ),
]
# 0001-01-01 .. 9999-12-31: what a timestamp can hold
MAX_EPOCH_MILLIS = 253_402_300_799_999
EpochMillis = Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH_MILLIS)]


class CreateSessionBody(msgspec.Struct, kw_only=True):
    training_project_id: ProjectId | None = None


class CreateRunBody(msgspec.Struct, kw_only=True):
    session_id: SessionId
    base_model: ModelName
    name: RunName | None = None
    max_seq_len: PosInt32 | None = None  # at most the model's context length
    lora_rank: LoraRank = 64
    seed: Int64 | None = None
    scale_down_delay_seconds: ScaleDownDelay | None = None
    availability_model: AvailabilityModel = "dedicated"
    replicas: Replicas = 1
    path: CheckpointPathOrEmpty | None = None  # a weights checkpoint to resume from
    base_checkpoint: Text | None = None  # a checkpoint to start the adapter from
    reuse_from_run_id: RunId | None = None
    reuse_from_session_id: SessionId | None = None
    activation_checkpointing: ActivationCheckpointing | None = None  # openloops extension


class CreateSamplerBody(msgspec.Struct, kw_only=True):
    session_id: SessionId
    base_model: ModelName | None = None
    run_id: RunId | None = None
    max_seq_length: PosInt32 | None = None
    model_path: CheckpointPathOrEmpty | None = None  # a sampler_weights checkpoint to serve
    reuse_from_session_id: SessionId | None = None


class ValidateCheckpointBody(msgspec.Struct, kw_only=True):
    checkpoint_path: Annotated[str, msgspec.Meta(pattern=LOOPS_SAMPLER_CHECKPOINT_PATH)]


class MetricsBody(msgspec.Struct, kw_only=True):
    start_epoch_millis: EpochMillis | None = None
    end_epoch_millis: EpochMillis | None = None
    step_seconds: Annotated[int, msgspec.Meta(ge=60, le=INT32_MAX, multiple_of=60)] | None = None
    time_divisor_seconds: PosInt32 | None = None

    def window(self) -> series.Window:
        """The series window these fields ask for (defaults filled in, checked)."""
        return series.Window.parse(
            self.start_epoch_millis, self.end_epoch_millis, self.step_seconds, self.time_divisor_seconds
        )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_WINDOW_MAX_MS = 7 * 24 * 3600 * 1000
LOG_WINDOW_DEFAULT_MS = 30 * 60 * 1000


@dataclass(frozen=True)
class LogsQuery:
    """The query of ``GET /v1/loops/deployments/{id}/logs``, validated."""

    start_ms: int
    end_ms: int
    direction: str
    limit: int
    min_level: str

    @classmethod
    def parse(
        cls, start_ms: int | None, end_ms: int | None, direction: str, limit: int, min_level: str, *, now_ms: int
    ) -> LogsQuery:
        end = end_ms if end_ms is not None else now_ms
        start = start_ms if start_ms is not None else end - LOG_WINDOW_DEFAULT_MS
        if not 0 <= start < end:
            raise InvalidInput(
                "start_epoch_millis must be >= 0 and before end_epoch_millis", field="start_epoch_millis"
            )
        if end - start > LOG_WINDOW_MAX_MS:
            raise InvalidInput("the window may span at most 7 days", field="start_epoch_millis")
        if direction not in ("asc", "desc"):
            raise InvalidInput("direction must be 'asc' or 'desc'", field="direction")
        if not 1 <= limit <= 1000:
            raise InvalidInput("limit must be between 1 and 1000", field="limit")
        level = min_level.upper()
        if level not in LOG_LEVELS:
            raise InvalidInput(f"min_level must be one of {', '.join(LOG_LEVELS)}", field="min_level")
        return cls(start, end, direction, limit, level)


# a Kubernetes Secret name (what hf_secret_name names on the Kubernetes backend)
SECRET_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
CheckpointIdField = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[^\x00]*$")]


class DeployCheckpointsBody(msgspec.Struct, kw_only=True):
    """``POST /v1/loops/checkpoints/deploy``: sampler_weights checkpoints of one base model."""

    checkpoint_ids: Annotated[list[CheckpointIdField], msgspec.Meta(min_length=1, max_length=16)]
    model_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
    instance_type_id: Annotated[str, msgspec.Meta(max_length=100, pattern=r"^[^\x00]*$")] | None = None
    hf_secret_name: Annotated[str, msgspec.Meta(max_length=253, pattern=SECRET_NAME)] | None = None
    # openloops extension: idle time before it scales to zero (default: the server's)
    scale_down_delay_seconds: Annotated[int, msgspec.Meta(ge=1, le=30 * 86400)] | None = None


class PatchCapacityBody(msgspec.Struct, kw_only=True):
    """``PATCH /v1/training/capacity``: the org's own ceiling for one GPU type. Loops' body also
    names a ``team_id``; openloops has no teams, so one is declined."""

    gpu_type: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    max_gpus: Annotated[int, msgspec.Meta(ge=0, le=100_000)]
    team_id: Annotated[str, msgspec.Meta(max_length=200)] | None = None
