"""The import check of a PEFT adapter (data_plane/wire/peft_adapter.py): what the trainer and
vLLM can take passes, everything else is refused with a message naming file and problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from data_plane.wire.peft_adapter import AdapterError, BaseShapes, inspect_adapter, normalized_config
from tests.control_plane.adapters import ATTN, make_adapter, tiny_config

BASE = BaseShapes.from_config(tiny_config())
L0_Q = "base_model.model.model.layers.0.self_attn.q_proj"


def check(d: Path, max_rank: int = 512, base: BaseShapes | None = BASE):
    return inspect_adapter(
        (d / "adapter_config.json").read_bytes(), d / "adapter_model.safetensors", max_rank=max_rank, base=base
    )


def test_a_trainer_layout_adapter_passes(tmp_path: Path) -> None:
    info = check(make_adapter(tmp_path, rank=4))
    assert (info.rank, info.alpha, info.train_attn, info.train_mlp, info.train_unembed) == (4, 16.0, True, True, False)
    assert info.tensors == 2 * 7 * 2
    assert info.lora_config() == {
        "rank": 4,
        "alpha": 16.0,
        "seed": 0,
        "train_attn": True,
        "train_mlp": True,
        "train_unembed": False,
    }
    # attention only, with the unembedding, in half precision, without a base config
    info = check(make_adapter(tmp_path / "b", rank=8, targets=[*ATTN, "lm_head"], dtype=np.float16), base=None)
    assert (info.train_attn, info.train_mlp, info.train_unembed) == (True, False, True)


def test_normalized_config_names_the_catalog_model(tmp_path: Path) -> None:
    d = make_adapter(tmp_path)
    cfg = json.loads(normalized_config(json.loads((d / "adapter_config.json").read_text()), "openloops/tiny"))
    assert cfg["base_model_name_or_path"] == "openloops/tiny" and cfg["inference_mode"] is True and cfg["r"] == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config_updates": {"peft_type": "IA3"}}, "only LORA"),
        ({"rank": 16, "config_updates": {}}, None),  # baseline for max_rank below
        ({"config_updates": {"target_modules": ".*proj"}}, "regular expression"),
        ({"config_updates": {"use_dora": True}}, "use_dora"),
        ({"config_updates": {"use_rslora": True}}, "use_rslora"),
        ({"config_updates": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
        ({"config_updates": {"bias": "all"}}, "bias"),
        ({"config_updates": {"lora_alpha": -1}}, "lora_alpha"),
        ({"config_updates": {"r": "8"}}, "LoRA rank"),
        ({"targets": ["q_proj", "v_proj"]}, "trains q_proj, k_proj, v_proj, o_proj together"),
        ({"targets": [*ATTN, "embed_tokens"]}, "cannot be trained here"),
        ({"drop": (f"{L0_Q}.lora_B.weight",)}, "has no lora_B"),
        ({"drop": (f"{L0_Q}.lora_A.weight", f"{L0_Q}.lora_B.weight")}, "1 layers, expected every one of 2"),
        ({"extra": {"base_model.model.model.embed_tokens.weight": np.zeros((4, 4), np.float32)}}, "not a LoRA matrix"),
        ({"extra": {f"{L0_Q}.lora_A.default.weight": np.zeros((4, 128), np.float32)}}, "not a LoRA matrix"),
        ({"dtype": np.int32}, "LoRA weights must be one of"),
        ({"config_updates": {"r": 8}}, "not rank r=8"),
        ({"cfg": {**tiny_config(), "hidden_size": 256}}, "an adapter for another model"),
        ({"cfg": {**tiny_config(), "num_hidden_layers": 3}}, "expected every one of 2"),
    ],
)
def test_what_cannot_be_taken_is_named(tmp_path: Path, kwargs: dict, message: str | None) -> None:
    d = make_adapter(tmp_path, **kwargs)
    if message is None:
        with pytest.raises(AdapterError, match=r"r \(the LoRA rank\) must be an integer in \[1, 8\]"):
            check(d, max_rank=8)
        return
    with pytest.raises(AdapterError, match=message):
        check(d)


def test_broken_files_are_named(tmp_path: Path) -> None:
    d = make_adapter(tmp_path)
    weights = d / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-10])  # truncated
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        check(d)
    weights.write_bytes(good + b"\0" * 8)  # trailing bytes
    with pytest.raises(AdapterError, match="bytes after the last tensor"):
        check(d)
    weights.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # a header longer than the file
    with pytest.raises(AdapterError, match="not a safetensors file"):
        check(d)
    weights.write_bytes(b"abc")
    with pytest.raises(AdapterError, match="too short"):
        check(d)
    header = b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}'
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(AdapterError, match="overlaps"):
        check(d)
    weights.write_bytes(good)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        check(d)
