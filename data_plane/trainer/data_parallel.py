"""Data-parallel replicas of a trainer: each takes a share of every batch.

A ``forward_backward`` is planned into micro-batches on every rank (the same plan: every rank
has the whole request); replica ``r`` of ``R`` runs micro-batches ``r, r + R, ...`` (the plan
sorts by length, so the shares are about even). Then the replicas exchange what they computed:

- outputs (per-datum log-probabilities, losses, metric sums) are merged, so every rank holds
  the whole answer (the leader sends it);
- gradients are summed at once: each replica ran its share from zero gradients, and every one
  adds the sum of all shares to the gradients it held before, so all replicas hold the same
  gradients after every call, as one process would (up to summation order). ``optim_step``
  then needs no communication, and a snapshot or checkpoint of the leader is the whole state;
- an error on any replica (a non-finite loss, a bad input found late) is the error of the
  call on all of them, and every replica puts its gradients back as they were.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_plane.trainer.ranks import Ranks

Share = dict[int, dict[str, np.ndarray]]  # datum index -> its outputs


class DataParallel:
    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.replicas = ranks.replicas
        self.replica = ranks.replica

    def share(self, groups: list[list[int]]) -> list[list[int]]:
        """This replica's micro-batches of a planned call."""
        return groups[self.replica :: self.replicas]

    def merge(
        self,
        per_datum: list[Any],
        sums: tuple[float, dict[str, float], dict[str, float]],
        error: Exception | None,
    ) -> tuple[tuple[float, dict[str, float], dict[str, float]], Exception | None]:
        """Exchange this replica's outputs and metric sums (loss, per-token stats, pair stats)
        for everyone's: fills ``per_datum`` in place; returns the summed metrics and the error
        of the call (the first replica's that had one), or None."""
        mine: Share = {i: rec for i, rec in enumerate(per_datum) if rec is not None}
        payload = (_portable(error), mine, sums)
        everyone: list[Any] = [None] * self.replicas
        dist.all_gather_object(everyone, payload, group=self.ranks.replica_peers_cpu)
        for replica, (err, _share, _sums) in enumerate(everyone):
            if err is not None:
                return sums, error if replica == self.replica and error is not None else err
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
        """Every replica's gradients of this call (each ran from none), summed, added to
        ``before`` (the gradients held before the call, the same on every replica)."""
        if not params:
            return
        had = any(p.grad is not None for p in params)
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        flag = parts[0].new_ones(1) if had else parts[0].new_zeros(1)
        flat = torch.cat([*parts, flag])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.ranks.replica_peers)
        if float(flat[-1].item()) == 0.0:  # no replica had anything to backpropagate
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
    """The error as it can travel to the other replicas (its type when it pickles)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable error travels as its message
        return RuntimeError(f"{type(error).__name__}: {error}")
