"""Architectures of the random models openloops builds offline (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TinyPreset:
    name: str
    model_name: str  # the base_model name we suggest registering it under
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # >= 32: vLLM's CPU attention backend requires it
    vocab_size: int  # model embedding rows (>= the trained tokenizer's size)
    tokenizer_vocab: int  # target BPE vocabulary (the trainer may stop short on a small corpus)
    corpus_lines: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False  # True: no lm_head weight, the output projection is the embedding
    dtype: str = "float32"  # of the written weights: float32 | bfloat16


PRESETS: dict[str, TinyPreset] = {
    # ~0.6 M params: unit and end-to-end tests, builds in well under a second.
    "tiny": TinyPreset(
        name="tiny",
        model_name="openloops/tiny",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=2048,
        tokenizer_vocab=2048,
        corpus_lines=3000,
        max_position_embeddings=4096,
    ),
    # ~8 M params: benchmarks (step time, throughput) without a real checkpoint.
    "bench": TinyPreset(
        name="bench",
        model_name="openloops/bench",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=8192,
        tokenizer_vocab=8192,
        corpus_lines=12000,
        max_position_embeddings=8192,
    ),
    # Qwen3-0.6B's architecture (its config.json: 28 layers, hidden 1024, 16 query / 8 KV heads of
    # 128, MLP 3072, 151,936 embedding rows, tied embeddings, rope theta 1e6, 40,960 positions;
    # 596 M params, 440 M outside the embedding) with random bfloat16 weights: GPU benchmarks
    # (bench.gpu_trainer) of a real model's shape without downloading it. The tokenizer is this
    # builder's own byte-level BPE (8,192 tokens); the embedding rows beyond it are padding, as
    # Qwen3's 151,936 rows are beyond its 151,669 tokens.
    "qwen3-0.6b": TinyPreset(
        name="qwen3-0.6b",
        model_name="openloops/qwen3-0.6b-random",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tokenizer_vocab=8192,
        corpus_lines=12000,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        dtype="bfloat16",
    ),
}
