"""The frozen base model sharded across a replica's ranks with FSDP2 (``fully_shard``).

Each decoder layer is one FSDP unit (its weights are gathered just for its forward and again
for its backward), the root the last (embeddings, final norm and output projection). LoRA
adapters are attached after sharding (:func:`data_plane.trainer.model.attach_lora`), once per
run: their weights are ordinary replicated tensors next to the sharded base weights, identical
on every rank of a replica because every rank computes the same data. A checkpoint is
therefore written by the leader alone, as a standard PEFT adapter that loads on any rank count.

Loading takes turns: the ranks of one machine load the full model to CPU memory one after the
other, each keeping only its shard (moved to its device) before the next one starts, so a
machine needs the memory of one full copy plus the shards, not one full copy per rank.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from data_plane.trainer.activation_checkpointing import decoder_layers
from data_plane.trainer.model import CausalLM, load_base
from data_plane.trainer.ranks import Ranks

log = logging.getLogger(__name__)


def shard_base(base: CausalLM, mesh: Any) -> CausalLM:
    """Shard ``base`` in place over ``mesh`` (one FSDP unit per decoder layer, then the root);
    parameters on CPU move to the mesh's device. Returns ``base``."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(base)
    if not layers:
        raise ValueError(f"{type(base).__name__} has no decoder layer list to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(base, mesh=mesh)
    return base


def load_sharded_base(source: str, ranks: Ranks, dtype: torch.dtype) -> CausalLM:
    """Load ``source`` on every rank, sharded over the rank's replica (taking turns per machine),
    or whole on the rank's device when a replica is one rank."""
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)))
    base: CausalLM | None = None
    for turn in range(local_world):
        if ranks.local_rank == turn:
            t0 = time.perf_counter()
            if ranks.mesh is None:
                base = load_base(source, ranks.device, dtype)
            else:
                base = shard_base(load_base(source, torch.device("cpu"), dtype), ranks.mesh)
            log.info("rank %d loaded its part of the base model in %.2fs", ranks.rank, time.perf_counter() - t0)
        dist.barrier(group=ranks.control)
    assert base is not None
    return base


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered weight of a sharded model (a no-op on an unsharded one).

    FSDP2 keeps the root's weights gathered between forward passes, and reshards them when the
    model's ``state_dict`` is taken. The leader alone takes it (to write a checkpoint): after
    such a call every rank reshards, so that all of them gather the same units in the next
    forward pass (otherwise their collectives no longer match)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
