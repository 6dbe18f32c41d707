"""The losses the trainer tests run on every code path: (name, datums, loss_fn_config) for each
Tinker loss, on the tiny model's vocabulary."""

from __future__ import annotations

import numpy as np

from tests.trainer.conftest import sft_batch

VOCAB = 2048  # the tiny model's


def _rl(seed: int) -> list[dict]:
    out = []
    for x in sft_batch(seed, n=3):
        n = len(x["tokens"])
        out.append(
            {
                "tokens": x["tokens"],
                "target_tokens": x["target_tokens"],
                "logprobs": np.full(n, -7.0, np.float32),
                "advantages": np.linspace(-1, 1, n).astype(np.float32),
            }
        )
    return out


def _pairs() -> list[dict]:
    rng = np.random.default_rng(5)
    return [
        dict(x, ref_logprobs=rng.uniform(-9, -6, len(x["tokens"])).astype(np.float32))
        for x in sft_batch(4, n=4, length=20)
    ]


def _two_dim() -> list[dict]:
    out = []
    for x in sft_batch(6, n=2):
        t = x["target_tokens"]
        out.append(
            {
                "tokens": x["tokens"],
                "target_tokens": np.stack([t, (t + 1) % VOCAB], 1),
                "weights": np.stack([x["weights"], 0.5 * x["weights"]], 1).astype(np.float32),
            }
        )
    return out


CASES = [
    ("cross_entropy", lambda: sft_batch(1, n=3), None),
    ("cross_entropy 2-D targets", _two_dim, None),
    ("importance_sampling", lambda: _rl(2), None),
    ("ppo", lambda: _rl(2), None),
    ("cispo", lambda: _rl(2), {"clip_high_threshold": 1.5}),
    ("dro", lambda: _rl(2), {"beta": 0.1}),
    ("dpo", _pairs, {"beta": 0.5}),
]
