"""Target log-probabilities through the output projection, a chunk of positions at a time.

The plain way (:func:`data_plane.trainer.losses.target_logprobs_and_lse` on full logits)
materialises ``[tokens, vocab]`` float32 logits, and the backward pass a softmax of the same
size: at 32k tokens and a 151k vocabulary that is tens of GB. Here the projection, the
logsumexp and the gather run on ``rows`` positions at a time under activation checkpointing:
the forward pass keeps only the hidden states and each chunk's two small outputs, and the
backward pass recomputes one chunk's logits at a time. Each position's values come from the
same row of hidden states and the same weights as in the plain way, so losses and gradients
agree with it to float rounding (the matmul is merely blocked differently).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from data_plane.trainer.losses import target_logprobs_and_lse, top_k_logprobs

FLOAT32_BYTES = 4


def rows_per_chunk(vocab: int, chunk_bytes: int) -> int:
    """How many positions' float32 logits fit in ``chunk_bytes``."""
    return max(1, chunk_bytes // (FLOAT32_BYTES * max(1, vocab)))


def _chunk(head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    return target_logprobs_and_lse(head(hidden), targets)


def target_logprobs(
    head: torch.nn.Module, hidden: Tensor, targets: Tensor, rows: int, top_k: int = 0
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """(target logprobs, float32 logsumexp ``[M, 1]``, top-k (logprobs, ids) or None) of
    ``head(hidden)`` for ``hidden`` ``[M, H]`` and ``targets`` ``[M]`` or ``[M, K]``, never more
    than ``rows`` positions' logits at once. Differentiable when grad is enabled."""
    fn = functools.partial(_chunk, head)
    tlps: list[Tensor] = []
    lses: list[Tensor] = []
    top_v: list[Tensor] = []
    top_i: list[Tensor] = []
    grad = torch.is_grad_enabled()
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        if grad:
            tlp, lse = checkpoint(fn, h, t, use_reentrant=False)
        else:
            tlp, lse = fn(h, t)
        tlps.append(tlp)
        lses.append(lse)
        if top_k:
            with torch.no_grad():
                v, i = top_k_logprobs(head(h.detach()), lse.detach(), top_k)
            top_v.append(v)
            top_i.append(i)
    if not tlps:  # no positions
        empty = hidden.new_zeros((0, *targets.shape[1:]), dtype=torch.float32)
        return empty, hidden.new_zeros((0, 1), dtype=torch.float32), None
    top = (torch.cat(top_v), torch.cat(top_i)) if top_k else None
    return torch.cat(tlps), torch.cat(lses), top
