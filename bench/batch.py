"""The benchmark training batch shared by bench.trainer_sdk, bench.durable and bench.loss_memory:
BATCH random sequences of SEQ + 1 tokens, LoRA rank RANK, learning rate LR (numpy only, so a
measured process can import it)."""

from __future__ import annotations

import numpy as np

BATCH, SEQ, RANK, LR = 32, 256, 32, 1e-4


def batch_tokens(vocab: int, seed: int = 0) -> np.ndarray:
    """BATCH random sequences of SEQ + 1 token ids (inputs and their next-token targets)."""
    return np.random.default_rng(seed).integers(0, vocab, size=(BATCH, SEQ + 1), dtype=np.int64)
