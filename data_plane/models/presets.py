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
}
