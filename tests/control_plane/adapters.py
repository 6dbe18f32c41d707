"""PEFT LoRA adapter directories for the tiny Qwen3 test model, written with numpy (as PEFT
names and shapes them), and tar archives of them for the import route."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from data_plane.models.presets import PRESETS
from data_plane.models.tiny import qwen3_config

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_config() -> dict[str, Any]:
    return qwen3_config(PRESETS["tiny"], eos_id=1, pad_id=0)


def module_paths(cfg: dict[str, Any], targets: list[str]) -> dict[str, tuple[int, int]]:
    """PEFT's saved module path -> (out, in) of each LoRA target of a Qwen3 model."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv, inter = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    shapes = {
        "q_proj": ("self_attn", q, h),
        "k_proj": ("self_attn", kv, h),
        "v_proj": ("self_attn", kv, h),
        "o_proj": ("self_attn", h, q),
        "gate_proj": ("mlp", inter, h),
        "up_proj": ("mlp", inter, h),
        "down_proj": ("mlp", h, inter),
    }
    out: dict[str, tuple[int, int]] = {}
    for i in range(cfg["num_hidden_layers"]):
        for t in targets:
            if t in shapes:
                block, o, n = shapes[t]
                out[f"model.layers.{i}.{block}.{t}"] = (o, n)
    if "lm_head" in targets:
        out["lm_head"] = (cfg["vocab_size"], h)
    return out


def make_adapter(
    directory: Path,
    *,
    rank: int = 4,
    targets: list[str] | None = None,
    cfg: dict[str, Any] | None = None,
    config_updates: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    dtype: Any = np.float32,
    seed: int = 0,
) -> Path:
    targets = targets if targets is not None else ATTN + MLP
    cfg = cfg or tiny_config()
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for module, (o, n) in module_paths(cfg, targets).items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.normal(0, 0.05, (rank, n)).astype(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(0, 0.05, (o, rank)).astype(dtype)
    for key in drop:
        tensors.pop(key)
    tensors.update(extra or {})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": targets,
        "base_model_name_or_path": "somewhere/else",
        "use_dora": False,
        "use_rslora": False,
        **(config_updates or {}),
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def tar_of(directory: Path, *, gz: bool = True, top: str | None = None, extra: dict[str, bytes] | None = None) -> bytes:
    """The files of ``directory`` as a tar archive (under ``top/`` when given)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for f in sorted(directory.iterdir()):
            tf.add(f, arcname=f"{top}/{f.name}" if top else f.name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
