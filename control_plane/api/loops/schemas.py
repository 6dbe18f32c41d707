"""Request bodies of the Loops management API. Unknown fields are ignored."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from control_plane.errors import InvalidInput


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
    base_checkpoint: str | None = None
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
