"""Load the base model with transformers and wrap it with a PEFT LoRA adapter.

LoRA conventions (the control plane reports these):

- ``alpha`` defaults to :data:`DEFAULT_ALPHA` = 32 whatever the rank (the "LoRA Without Regret"
  / Tinker parametrisation: scale ``alpha / rank``, B initialised to zero, so the optimal
  learning rate is roughly independent of the rank and cookbook learning rates carry over).
- ``seed`` seeds the adapter initialisation (A: PEFT's default Kaiming-uniform; B: zeros). When
  the client gives none, the worker derives one from the model id (a replay after a crash
  builds the same adapter); it is recorded in checkpoint metadata.
- target modules: ``train_attn`` -> q/k/v/o_proj, ``train_mlp`` -> gate/up/down_proj,
  ``train_unembed`` -> lm_head. Dropout 0, no bias.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import torch

from data_plane.trainer.errors import ServerError, UserError
from data_plane.wire.op_bodies import LoraSpec

# A transformers causal LM, or its PEFT wrapper. Their annotations of ``.to()``, ``.config`` and
# the PEFT wrapper's forwarded attributes do not type-check as used, so these stay ``Any``.
CausalLM = Any

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 32.0
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
MAX_RANK = 1024


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """A :class:`LoraSpec` with every default resolved (what checkpoints record)."""

    rank: int
    alpha: float
    seed: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool

    @classmethod
    def resolve(cls, spec: LoraSpec, default_seed: int | None = None) -> LoraSettings:
        """``default_seed`` is used when the client gave none (else a random one is drawn)."""
        if not isinstance(spec.rank, int) or isinstance(spec.rank, bool) or not 1 <= spec.rank <= MAX_RANK:
            raise UserError(f"lora rank must be an integer in [1, {MAX_RANK}], got {spec.rank!r}")
        alpha = DEFAULT_ALPHA if spec.alpha is None else float(spec.alpha)
        if not (alpha > 0 and alpha < float("inf")):
            raise UserError(f"lora alpha must be a positive finite number, got {spec.alpha!r}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise UserError("at least one of train_attn, train_mlp, train_unembed must be true")
        seed = spec.seed if spec.seed is not None else default_seed
        if seed is None:
            seed = secrets.randbits(31)
        if not isinstance(seed, int) or seed < 0:
            raise UserError(f"lora seed must be a non-negative integer, got {spec.seed!r}")
        return cls(spec.rank, alpha, seed, bool(spec.train_attn), bool(spec.train_mlp), bool(spec.train_unembed))

    @classmethod
    def from_dict(cls, d: dict) -> LoraSettings:
        return cls(
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            seed=int(d["seed"]),
            train_attn=bool(d["train_attn"]),
            train_mlp=bool(d["train_mlp"]),
            train_unembed=bool(d["train_unembed"]),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def target_modules(self) -> list[str]:
        mods: list[str] = []
        if self.train_attn:
            mods += ATTN_MODULES
        if self.train_mlp:
            mods += MLP_MODULES
        if self.train_unembed:
            mods += UNEMBED_MODULES
        return mods


def pick_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ServerError(f"device {requested!r} requested but CUDA is not available")
        return torch.device(requested)
    if requested != "auto":
        raise ServerError(f"unknown device {requested!r} (auto | cpu | cuda)")
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (when supported), float32 on CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base(source: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """The frozen base model, in eval mode (no dropout), on ``device``."""
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    model: CausalLM = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # KV caching is useless for training and costs memory.
    model.config.use_cache = False
    return model


def vocab_size(base: CausalLM) -> int:
    return int(base.get_output_embeddings().weight.shape[0])


def attach_lora(base: CausalLM, settings: LoraSettings, adapter_name: str = "default") -> CausalLM:
    """Wrap ``base`` with a fresh, seeded LoRA adapter; returns the PEFT model (train mode off:
    the base has no dropout to toggle and LoRA dropout is 0)."""
    from peft import LoraConfig, get_peft_model

    missing = [m for m in settings.target_modules() if not _has_module(base, m)]
    if missing:
        raise UserError(f"this base model has no {missing} modules to put LoRA on")
    cfg = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # annotated int; a float alpha works
        lora_dropout=0.0,
        bias="none",
        target_modules=settings.target_modules(),
        task_type="CAUSAL_LM",
        init_lora_weights=True,
    )
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        torch.manual_seed(settings.seed)
        model = get_peft_model(base, cfg, adapter_name=adapter_name)
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    # LoRA params in float32 even when the base is bf16: the optimizer state is then exact.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.eval()
    return model


def _has_module(base: CausalLM, suffix: str) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for name, _ in base.named_modules())


def trainable_parameters(model: CausalLM) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
