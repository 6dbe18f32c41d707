"""The ranks of a trainer split every batch between them.

Every rank has the whole request and splits it the same way: the datums (``dpo`` pairs as one
unit), sorted by length, are dealt out round robin, rank ``k`` of ``W`` getting units ``k, k + W,
...`` (so the shares are about even), and each rank plans its share into micro-batches. This
holds whether the ranks are replicas of the whole model or shards of one (with FSDP2 a sharded
rank computes whole layers on its own data; only the weights are split). The ranks of one
sharded replica must run the same number of passes (each pass gathers every layer's weights
from all of them), so a rank with fewer micro-batches than another of its replica adds
one-token passes that contribute nothing. Then the ranks exchange what they computed:

- outputs (per-datum log-probabilities, losses, metric sums) are merged, so every rank holds
  the whole answer (the leader sends it);
- gradients are summed at once: each rank ran its share from zero gradients, and every one
  adds the sum of all shares to the gradients it held before, so all ranks hold the same
  gradients after every call, as one process would (up to summation order). ``optim_step``
  then needs no communication, and a snapshot or checkpoint of the leader is the whole state;
- an error on any rank (a non-finite loss, a bad input found late) is the error of the call on
  all of them, and every rank puts its gradients back as they were.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_plane.trainer.batches import Prepared, plan_microbatches, units
from data_plane.trainer.ranks import Ranks

Share = dict[int, dict[str, np.ndarray]]  # datum index -> its outputs


class DataParallel:
    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.shares = ranks.world
        self.index = ranks.rank

    def plan(self, data: Sequence[Prepared], budget_tokens: int, pairs: bool) -> tuple[list[list[int]], int]:
        """This rank's micro-batches of a call (datum indices), and how many empty passes it
        must add to keep step with the other ranks of its replica."""
        shares: list[list[int]] = [[] for _ in range(self.shares)]
        for n, unit in enumerate(units(data, pairs)):
            shares[n % self.shares].extend(unit)
        plans = [
            [[share[i] for i in group] for group in plan_microbatches([data[i] for i in share], budget_tokens, pairs)]
            for share in shares
        ]
        mine = plans[self.index]
        if self.ranks.shard_size == 1:
            return mine, 0
        first = self.ranks.replica * self.ranks.shard_size
        most = max(len(p) for p in plans[first : first + self.ranks.shard_size])
        return mine, most - len(mine)

    def merge(
        self,
        per_datum: list[Any],
        sums: tuple[float, dict[str, float], dict[str, float]],
        error: Exception | None,
    ) -> tuple[tuple[float, dict[str, float], dict[str, float]], Exception | None]:
        """Exchange this rank's outputs and metric sums (loss, per-token stats, pair stats) for
        everyone's: fills ``per_datum`` in place; returns the summed metrics and the error of the
        call (the first rank's that had one), or None."""
        mine: Share = {i: rec for i, rec in enumerate(per_datum) if rec is not None}
        payload = (_portable(error), mine, sums)
        everyone: list[Any] = [None] * self.shares
        dist.all_gather_object(everyone, payload, group=self.ranks.control)
        for index, (err, _share, _sums) in enumerate(everyone):
            if err is not None:
                return sums, error if index == self.index and error is not None else err
        loss = 0.0
        stats: dict[str, float] = {}
        pair_stats: dict[str, float] = {}
        for _err, share, (l_sum, s_sum, p_sum) in everyone:
            for i, rec in share.items():
                per_datum[i] = rec
            loss += l_sum
            _add(stats, s_sum)
            _add(pair_stats, p_sum)
        return (loss, stats, pair_stats), None

    def sum_grads(self, params: list[torch.nn.Parameter], before: list[torch.Tensor | None]) -> None:
        """Every rank's gradients of this call (each ran from none), summed, added to
        ``before`` (the gradients held before the call, the same on every rank)."""
        if not params:
            return
        had = any(p.grad is not None for p in params)
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        flag = parts[0].new_ones(1) if had else parts[0].new_zeros(1)
        flat = torch.cat([*parts, flag])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if float(flat[-1].item()) == 0.0:  # no rank had anything to backpropagate
            for p, g in zip(params, before, strict=True):
                p.grad = g
            return
        offset = 0
        for p, g in zip(params, before, strict=True):
            n = p.numel()
            total = flat[offset : offset + n].view_as(p)
            p.grad = total.clone() if g is None else g + total
            offset += n


def _add(into: dict[str, float], values: dict[str, float]) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + v


def _portable(error: Exception | None) -> Exception | None:
    """The error as it can travel to the other ranks (its type when it pickles)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable error travels as its message
        return RuntimeError(f"{type(error).__name__}: {error}")
