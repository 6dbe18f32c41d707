"""The ranks of one trainer under torchrun: who is who, and the process groups between them.

A trainer with several ranks is ``replicas`` copies of ``WORLD_SIZE / replicas`` ranks each.
The ranks of one copy (a *replica*) shard the frozen base model between them with FSDP2
(:mod:`data_plane.trainer.sharding`); a replica of one rank holds the whole model. Every rank
takes its own share of every batch (:mod:`data_plane.trainer.data_parallel`). Global rank 0
(the *leader*) alone talks to Redis and writes to the object store; it sends every model call
to the others (:mod:`data_plane.trainer.group_calls`).

Process groups:

- the default group (every rank, on the training device's backend): gradient sums;
- ``control``: every rank, gloo (CPU): the leader's calls, the merge of the shares' outputs,
  and the check that every rank got the same outcome. Idle followers block in it between ops,
  so its timeout is long;
- ``mesh``: the replica's own ranks, the device mesh the base model is sharded over.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# followers wait in the control group while the run is idle (a deployment stays up for up to an
# hour without ops before it scales to zero), so its collectives must not time out before that
IDLE_TIMEOUT = datetime.timedelta(days=7)


class RankSetupError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Ranks:
    world: int
    rank: int
    local_rank: int
    replicas: int
    device: torch.device
    control: Any  # ProcessGroup (all ranks, gloo)
    mesh: Any  # DeviceMesh of this replica's ranks (None when a replica is one rank)

    @property
    def shard_size(self) -> int:
        return self.world // self.replicas

    @property
    def replica(self) -> int:
        return self.rank // self.shard_size

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world} (replica {self.replica + 1} of {self.replicas}, "
            f"{self.shard_size} rank(s) per replica) on {self.device}"
        )


def world_from_env(environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1") or 1)


def init(replicas: int, device_kind: str) -> Ranks:
    """Join the torchrun group (``WORLD_SIZE`` > 1) on ``device_kind`` (``cpu`` | ``cuda``)."""
    world = world_from_env()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if replicas < 1 or world % replicas:
        raise RankSetupError(f"{world} ranks cannot form {replicas} equal replicas")
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise RankSetupError("device cuda requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, timeout=IDLE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    shard_size = world // replicas
    mesh = None
    if shard_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        # "fsdp": PEFT sizes LoRA layers on a sharded weight by its full shape only on a mesh
        # dimension of that name (any other name means tensor parallelism to it: local shapes)
        mesh2d = init_device_mesh(device.type, (replicas, shard_size), mesh_dim_names=("replicate", "fsdp"))
        mesh = mesh2d["fsdp"]
    ranks = Ranks(world, rank, local_rank, replicas, device, control, mesh)
    log.info("trainer %s", ranks.describe())
    return ranks


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
