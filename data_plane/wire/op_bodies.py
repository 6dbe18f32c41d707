"""JSON bodies of the non-protobuf ops on a run's stream (see :mod:`data_plane.wire.queue`).

The control plane validates client input before it builds one of these; the worker trusts the
shape but still validates everything that depends on the model (vocabulary, lengths, shapes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# How a run's trainer keeps decoder activations (data_plane.trainer.activation_checkpointing):
# recompute them in the backward pass always (on), never (off), or for micro-batches of long
# sequences (auto). A run chooses one at creation; one that does not gets the worker's default.
ACTIVATION_CHECKPOINTING_MODES = ("auto", "on", "off")


@dataclass(frozen=True, slots=True)
class LoraSpec:
    rank: int = 32
    alpha: float | None = None  # None: the worker uses 32 at any rank (Tinker convention)
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclass(frozen=True, slots=True)
class AdamSpec:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0: no clipping


@dataclass(frozen=True, slots=True)
class CreateBody:
    """seq 0 of a fresh LoRA training model."""

    lora: LoraSpec = field(default_factory=LoraSpec)
    # the run's ACTIVATION_CHECKPOINTING_MODES choice; None: the worker's default
    activation_checkpointing: str | None = None


@dataclass(frozen=True, slots=True)
class LoadWeightsBody:
    """Restore a ``weights`` checkpoint. As seq 0 it creates the model from the checkpoint
    (its LoRA config comes from the checkpoint's metadata); later it replaces the adapter
    weights (and the optimizer state when ``optimizer`` is true) of the live model."""

    storage_prefix: str
    tinker_path: str
    optimizer: bool
    # as seq 0 only: the run's ACTIVATION_CHECKPOINTING_MODES choice (None: the worker's default)
    activation_checkpointing: str | None = None


@dataclass(frozen=True, slots=True)
class OptimStepBody:
    adam: AdamSpec


@dataclass(frozen=True, slots=True)
class SaveBody:
    """save_weights (kind "weights": adapter + optimizer + metadata),
    save_weights_for_sampler (kind "sampler_weights": PEFT adapter only) or
    save_weights_external (kind "external_weights": PEFT adapter only, for download)."""

    checkpoint_kind: str
    storage_prefix: str
    name: str | None = None
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None
    # sampler_weights only: make it the adapter the run's paired sampler serves (Loops
    # save_weights_and_get_sampling_client sends bump_version)
    publish: bool = False


@dataclass(frozen=True, slots=True)
class InitTrainerBody:
    """Loops ``init_trainer_server``: reset the adapter to its initial values."""

    lora_rank: int


def encode(body: Any) -> bytes:
    return json.dumps(asdict(body)).encode()


def decode_create(raw: bytes) -> CreateBody:
    d = json.loads(raw)
    return CreateBody(lora=LoraSpec(**d.get("lora", {})), activation_checkpointing=d.get("activation_checkpointing"))


def decode_load(raw: bytes) -> LoadWeightsBody:
    return LoadWeightsBody(**json.loads(raw))


def decode_optim(raw: bytes) -> OptimStepBody:
    d = json.loads(raw)
    return OptimStepBody(adam=AdamSpec(**d["adam"]))


def decode_save(raw: bytes) -> SaveBody:
    return SaveBody(**json.loads(raw))


def decode_init(raw: bytes) -> InitTrainerBody:
    return InitTrainerBody(**json.loads(raw))
