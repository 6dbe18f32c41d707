"""Checkpoint files in the object store.

Layout under a checkpoint's ``storage_prefix`` (keys ``{prefix}/{file}``):

| file | sampler_weights, external_weights | weights | what |
|---|---|---|---|
| ``adapter_config.json`` | yes | yes | PEFT LoRA config (``base_model_name_or_path`` = the run's base model name) |
| ``adapter_model.safetensors`` | yes | yes | LoRA A/B matrices only (PEFT key names), float32 |
| ``optimizer.safetensors`` | no | yes | AdamW state per trainable parameter: ``{param}::exp_avg``, ``::exp_avg_sq``, ``::step`` |
| ``openloops_checkpoint.json`` | yes | yes | :class:`CheckpointMeta` (written last) |

``external_weights`` (``save_weights_external``, what ``tinker checkpoint download`` fetches) is
the same adapter as ``sampler_weights``, kept apart so that exports are listed and expire on
their own.

The adapter pair is what ``peft.PeftModel.from_pretrained`` and vLLM's ``--enable-lora`` load.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from data_plane.storage.base import ObjectNotFound, ObjectStore
from data_plane.trainer.errors import UserError
from data_plane.trainer.model import CausalLM, LoraSettings
from data_plane.wire.queue import CheckpointFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
METADATA = "openloops_checkpoint.json"
FORMAT_VERSION = 1
KINDS = ("weights", "sampler_weights", "external_weights")


@dataclass(frozen=True, slots=True)
class CheckpointMeta:
    kind: str
    model_id: str
    base_model: str
    lora: dict[str, Any]
    target_modules: list[str]
    optimizer_step: int  # optim_steps applied to these weights
    has_optimizer: bool
    seq_id: int  # the op's position in the model's sequence
    created_at: float = field(default_factory=time.time)
    optimizer: str = "adamw"
    format_version: int = FORMAT_VERSION
    # sampler_weights: {"tokens": [...], "logprobs": [...]}, the trainer's prompt logprobs of
    # data_plane.wire.probe.probe_tokens with these weights (a served copy is checked against it)
    probe: dict[str, Any] | None = None


def key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}"


def adapter_state(peft_model: CausalLM, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's saved key names (no adapter name, no embeddings)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def adapter_config_json(peft_model: CausalLM, base_model_name: str, adapter_name: str = "default") -> bytes:
    cfg = peft_model.peft_config[adapter_name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)  # PEFT's own serialisation (sets/lists, enums...)
        d = json.loads((Path(tmp) / ADAPTER_CONFIG).read_text())
    d["base_model_name_or_path"] = base_model_name
    if isinstance(d.get("target_modules"), list):
        d["target_modules"] = sorted(d["target_modules"])  # PEFT stores a set: make it stable
    d["inference_mode"] = True
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


def _param_key_from_saved(saved_key: str, adapter_name: str) -> str:
    # PEFT strips the adapter name when saving: "...q_proj.lora_A.weight" <- "...q_proj.lora_A.default.weight"
    for part in (".lora_A.", ".lora_B."):
        if part in saved_key:
            head, tail = saved_key.split(part, 1)
            return f"{head}{part}{adapter_name}.{tail}"
    return saved_key


def optimizer_state(
    optimizer: torch.optim.Optimizer, named_params: list[tuple[str, torch.nn.Parameter]]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        st = optimizer.state.get(p)
        if not st:
            continue
        out[f"{name}::exp_avg"] = st["exp_avg"].detach().to("cpu").contiguous()
        out[f"{name}::exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu").contiguous()
        step = st["step"]
        out[f"{name}::step"] = (
            (step if torch.is_tensor(step) else torch.tensor(float(step))).detach().to("cpu", torch.float32).reshape(1)
        )
    return out


def write_checkpoint(
    store: ObjectStore,
    prefix: str,
    *,
    kind: str,
    peft_model: CausalLM,
    meta: CheckpointMeta,
    optimizer: torch.optim.Optimizer | None,
    named_params: list[tuple[str, torch.nn.Parameter]],
) -> list[CheckpointFile]:
    """Serialise everything first, then upload; the metadata file goes last."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    files: list[tuple[str, bytes]] = [
        (ADAPTER_CONFIG, adapter_config_json(peft_model, meta.base_model)),
        (ADAPTER_WEIGHTS, st_save(adapter_state(peft_model), metadata={"format": "pt"})),
    ]
    if kind == "weights" and optimizer is not None:
        files.append((OPTIMIZER_STATE, st_save(optimizer_state(optimizer, named_params), metadata={"format": "pt"})))
    files.append((METADATA, (json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n").encode()))
    for name, data in files:
        store.put_bytes(key(prefix, name), data)
    return [CheckpointFile(relative_path=name, size_bytes=len(data)) for name, data in files]


@dataclass(slots=True)
class LoadedCheckpoint:
    meta: CheckpointMeta | None
    lora: LoraSettings
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None


def _get(store: ObjectStore, prefix: str, name: str, tinker_path: str) -> bytes:
    try:
        return store.get_bytes(key(prefix, name))
    except ObjectNotFound:
        raise UserError(f"checkpoint {tinker_path} has no {name} (missing or not a LoRA checkpoint)") from None


def read_checkpoint(store: ObjectStore, prefix: str, tinker_path: str, want_optimizer: bool) -> LoadedCheckpoint:
    """Read a checkpoint. Its LoRA settings come from the metadata file, or (for adapters not
    written by us) from ``adapter_config.json``."""
    meta: CheckpointMeta | None = None
    if store.exists(key(prefix, METADATA)):
        d = json.loads(store.get_bytes(key(prefix, METADATA)))
        known = set(CheckpointMeta.__dataclass_fields__)
        meta = CheckpointMeta(**{k: v for k, v in d.items() if k in known})
        if meta.format_version > FORMAT_VERSION:
            raise UserError(f"checkpoint {tinker_path} has format {meta.format_version}, newer than this worker")
        lora = LoraSettings.from_dict(meta.lora)
    else:
        cfg = json.loads(_get(store, prefix, ADAPTER_CONFIG, tinker_path))
        lora = lora_from_adapter_config(cfg)
    adapter = st_load(_get(store, prefix, ADAPTER_WEIGHTS, tinker_path))
    opt = None
    if want_optimizer:
        if meta is not None and not meta.has_optimizer:
            raise UserError(f"checkpoint {tinker_path} holds no optimizer state (save it with save_state)")
        opt = st_load(_get(store, prefix, OPTIMIZER_STATE, tinker_path))
    return LoadedCheckpoint(meta, lora, adapter, opt)


def lora_from_adapter_config(cfg: dict) -> LoraSettings:
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise UserError("adapter_config.json target_modules as a regex is not supported")
    targets = set(targets)
    return LoraSettings(
        rank=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", cfg["r"])),
        seed=0,
        train_attn=bool(targets & {"q_proj", "k_proj", "v_proj", "o_proj"}),
        train_mlp=bool(targets & {"gate_proj", "up_proj", "down_proj"}),
        train_unembed="lm_head" in targets,
    )


def load_adapter_into(peft_model: CausalLM, adapter: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy saved LoRA tensors into the live adapter. Checks names and shapes of every tensor
    before copying anything (a mismatch raises :class:`UserError` and changes nothing)."""
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    mapped = {_param_key_from_saved(k, adapter_name): v for k, v in adapter.items()}
    missing = sorted(set(params) - set(mapped))
    extra = sorted(set(mapped) - set(params))
    if missing or extra:
        raise UserError(
            f"checkpoint adapter does not match this model's LoRA layout "
            f"({len(missing)} missing, {len(extra)} unexpected tensors, e.g. {(missing or extra)[:2]})"
        )
    for name, t in mapped.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise UserError(
                f"checkpoint tensor {name} has shape {tuple(t.shape)}, model expects {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, t in mapped.items():
            params[name].copy_(t.to(params[name].device, params[name].dtype))


def load_optimizer_into(
    optimizer: torch.optim.Optimizer,
    named_params: list[tuple[str, torch.nn.Parameter]],
    state: dict[str, torch.Tensor],
) -> None:
    """Replace the AdamW state with a saved one (validated fully before anything changes)."""
    names = {n for n, _ in named_params}
    saved = {k.rsplit("::", 1)[0] for k in state}
    unknown = sorted(saved - names)
    if unknown:
        raise UserError(f"checkpoint optimizer state names parameters this model lacks, e.g. {unknown[:2]}")
    new_state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for name, p in named_params:
        if name not in saved:
            continue
        try:
            ea, eas, step = state[f"{name}::exp_avg"], state[f"{name}::exp_avg_sq"], state[f"{name}::step"]
        except KeyError as exc:
            raise UserError(f"checkpoint optimizer state is incomplete: {exc}") from None
        if tuple(ea.shape) != tuple(p.shape) or tuple(eas.shape) != tuple(p.shape):
            raise UserError(f"checkpoint optimizer state for {name} has the wrong shape")
        new_state[p] = {
            "step": step.reshape(()).to(torch.float32).clone(),
            "exp_avg": ea.to(p.device, p.dtype).clone(),
            "exp_avg_sq": eas.to(p.device, p.dtype).clone(),
        }
    optimizer.state.clear()
    for p, st in new_state.items():
        optimizer.state[p] = st
