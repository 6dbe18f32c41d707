"""Build a tiny random Qwen3-style causal LM plus tokenizer, offline and deterministically.

The weights are drawn with numpy and written with ``safetensors`` directly (no torch or
transformers import), so a build takes a fraction of a second (the ``qwen3-0.6b`` preset, 596 M
bfloat16 weights, a few seconds). The directory is an ordinary Hugging Face model directory:
transformers, peft and vLLM load it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from data_plane.models.manifest import ModelManifest, write_manifest
from data_plane.models.presets import PRESETS, TinyPreset
from data_plane.models.tokenizer import EOS_TOKEN, PAD_TOKEN, save_tokenizer, train_tokenizer

INIT_STD = 0.02  # Qwen3 initializer_range


def qwen3_config(p: TinyPreset, eos_id: int, pad_id: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": p.dtype,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": p.intermediate_size,
        "layer_types": ["full_attention"] * p.num_hidden_layers,
        "max_position_embeddings": p.max_position_embeddings,
        "max_window_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": p.rope_theta, "rope_type": "default"},
        "rope_theta": p.rope_theta,  # read by older transformers / vLLM config parsers
        "rope_scaling": None,
        "sliding_window": None,
        "tie_word_embeddings": p.tie_word_embeddings,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": p.vocab_size,
    }


def random_weights(p: TinyPreset, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, d, i = p.hidden_size, p.head_dim, p.intermediate_size

    def normal(*shape: int) -> np.ndarray:
        if p.dtype == "float32":  # the original draw: these presets' files stay byte-identical
            return rng.normal(0.0, INIT_STD, size=shape).astype(np.float32)
        return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(INIT_STD)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(p.vocab_size, h)}
    for layer in range(p.num_hidden_layers):
        pre = f"model.layers.{layer}."
        w[pre + "input_layernorm.weight"] = ones(h)
        w[pre + "post_attention_layernorm.weight"] = ones(h)
        w[pre + "self_attn.q_proj.weight"] = normal(p.num_attention_heads * d, h)
        w[pre + "self_attn.k_proj.weight"] = normal(p.num_key_value_heads * d, h)
        w[pre + "self_attn.v_proj.weight"] = normal(p.num_key_value_heads * d, h)
        w[pre + "self_attn.o_proj.weight"] = normal(h, p.num_attention_heads * d)
        w[pre + "self_attn.q_norm.weight"] = ones(d)
        w[pre + "self_attn.k_norm.weight"] = ones(d)
        w[pre + "mlp.gate_proj.weight"] = normal(i, h)
        w[pre + "mlp.up_proj.weight"] = normal(i, h)
        w[pre + "mlp.down_proj.weight"] = normal(h, i)
    w["model.norm.weight"] = ones(h)
    if not p.tie_word_embeddings:
        w["lm_head.weight"] = normal(p.vocab_size, h)
    return w


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest, ties to even) as the raw uint16 bit patterns
    (numpy has no bfloat16; finite inputs only)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def save_bfloat16_safetensors(weights: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """Write float32 arrays as a bfloat16 ``.safetensors`` file (the format: an 8-byte
    little-endian header length, a JSON header of dtype/shape/byte offsets, then the raw
    little-endian data), converting one tensor at a time."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, a in weights.items():
        size = a.size * 2
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for a in weights.values():
            fh.write(to_bfloat16_bits(a).astype("<u2", copy=False).tobytes())


def build_tiny(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> ModelManifest:
    """Write ``config.json``, ``model.safetensors`` and tokenizer files into ``out_dir``.

    The same preset and seed give byte-identical files. Returns the manifest (also written as
    ``openloops-model.json`` in ``out_dir``).
    """
    from safetensors.numpy import save_file

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(p.tokenizer_vocab, p.corpus_lines, seed)
    if tok.get_vocab_size() > p.vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens > model vocab {p.vocab_size}")
    eos_id, pad_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    if eos_id is None or pad_id is None:
        raise RuntimeError(f"the trained tokenizer lacks {EOS_TOKEN!r} or {PAD_TOKEN!r}")
    save_tokenizer(tok, out, p.max_position_embeddings)

    cfg = qwen3_config(p, eos_id, pad_id)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    weights = random_weights(p, seed)
    if p.dtype == "bfloat16":
        save_bfloat16_safetensors(weights, out / "model.safetensors", metadata={"format": "pt"})
    elif p.dtype == "float32":
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(f"preset {preset!r}: unsupported dtype {p.dtype!r}")

    manifest = ModelManifest(
        name=p.model_name,
        path=str(out),
        tokenizer_path=str(out),
        max_context_length=p.max_position_embeddings,
        architecture="Qwen3ForCausalLM",
        num_parameters=int(sum(a.size for a in weights.values())),
        dtype=p.dtype,
        source=f"build_tiny(preset={preset!r}, seed={seed})",
        preset=preset,
    )
    write_manifest(out, manifest)
    return manifest
