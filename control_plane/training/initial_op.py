"""Seq 0 of a run created through the Loops API (Tinker clients send their own)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Checkpoint, Run
from control_plane.training.queue import TrainerQueue
from data_plane.wire import op_bodies
from data_plane.wire.paths import parse_checkpoint_path
from data_plane.wire.queue import OpKind

if TYPE_CHECKING:
    from control_plane.runtime import Runtime


async def enqueue_initial_op(r: Runtime, s: AsyncSession, run: Run) -> str:
    queue = TrainerQueue(r.redis)
    if run.init_path:
        ref = parse_checkpoint_path(run.init_path)
        ckpt = (
            await s.execute(
                select(Checkpoint).where(
                    Checkpoint.run_id == ref.run_id, Checkpoint.kind == ref.kind, Checkpoint.name == ref.name
                )
            )
        ).scalar_one()
        body = op_bodies.encode(
            op_bodies.LoadWeightsBody(storage_prefix=ckpt.storage_prefix, tinker_path=ref.tinker_path, optimizer=True)
        )
        kind = OpKind.LOAD_WEIGHTS
    else:
        body = op_bodies.encode(
            op_bodies.CreateBody(lora=op_bodies.LoraSpec(rank=run.lora_rank, seed=run.seed))
        )
        kind = OpKind.CREATE
    rid, _ = await queue.submit(run.id, run.id, 0, kind, body, org_id=run.org_id)
    return rid
