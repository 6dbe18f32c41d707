"""The probe sequence of a sampler checkpoint: a fixed, model-independent token sequence whose
prompt logprobs the trainer records at save time (in ``openloops_checkpoint.json``, key
``probe``), so that a server that later serves the adapter can be checked against the trainer
without one (control_plane/sampling/served_verify.py). Pure Python: both planes use it."""

from __future__ import annotations

import random
from typing import Any

PROBE_LENGTH = 16
_SEED = 20261206


def probe_tokens(vocab_size: int, length: int = PROBE_LENGTH) -> list[int]:
    """``length`` token ids in ``[0, vocab_size)``, the same for every model of that vocabulary."""
    rng = random.Random(_SEED)
    return [rng.randrange(vocab_size) for _ in range(length)]


def parse_probe(meta: dict[str, Any]) -> tuple[list[int], list[float]] | None:
    """``(tokens, logprobs)`` from a checkpoint's metadata (``logprobs[i]`` is the logprob of
    ``tokens[i + 1]`` after ``tokens[: i + 1]``), or None when it has no usable probe."""
    probe = meta.get("probe")
    if not isinstance(probe, dict):
        return None
    tokens, logprobs = probe.get("tokens"), probe.get("logprobs")
    if (
        not isinstance(tokens, list)
        or not isinstance(logprobs, list)
        or len(tokens) < 2
        or len(logprobs) != len(tokens) - 1
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)
        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in logprobs)
    ):
        return None
    return tokens, [float(x) for x in logprobs]
