"""Rows as the Tinker SDK's REST types (``TrainingRun``, ``Checkpoint``)."""

from __future__ import annotations

from control_plane.api.tinker.responses import Checkpoint as CheckpointOut
from control_plane.api.tinker.responses import OptimizerConfig, TrainingRun, WeightsInfo
from control_plane.db.models import Checkpoint, Run
from data_plane.wire.paths import CheckpointRef

CHECKPOINT_TYPE = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def checkpoint_json(c: Checkpoint) -> CheckpointOut:
    ref = CheckpointRef(c.run_id, c.kind, c.name)
    return CheckpointOut(
        checkpoint_id=ref.checkpoint_id,
        checkpoint_type=CHECKPOINT_TYPE.get(c.kind, "training"),
        time=c.created_at.isoformat(),
        tinker_path=ref.tinker_path,
        size_bytes=c.size_bytes,
        public=c.public,
        user_metadata={str(k): str(v) for k, v in (c.user_metadata or {}).items()} or None,
        expires_at=c.expires_at.isoformat() if c.expires_at else None,
    )


def training_run_json(run: Run, last: Checkpoint | None, last_sampler: Checkpoint | None) -> TrainingRun:
    return TrainingRun(
        training_run_id=run.id,
        base_model=run.base_model,
        model_owner=run.created_by,
        is_lora=True,
        corrupted=False,
        lora_rank=run.lora_rank,
        last_request_time=(run.last_request_at or run.created_at).isoformat(),
        last_checkpoint=checkpoint_json(last) if last else None,
        last_sampler_checkpoint=checkpoint_json(last_sampler) if last_sampler else None,
        user_metadata={str(k): v if isinstance(v, str) else str(v) for k, v in (run.user_metadata or {}).items()},
        status=run.status,
        session_id=run.session_id,
    )


def weights_info_json(c: Checkpoint) -> WeightsInfo:
    lora = c.lora_config or {}
    return WeightsInfo(
        base_model=c.base_model,
        optimizer_config=OptimizerConfig(type="adamw"),
        is_lora=True,
        lora_rank=lora.get("rank"),
        train_unembed=lora.get("train_unembed"),
        train_mlp=lora.get("train_mlp"),
        train_attn=lora.get("train_attn"),
    )
