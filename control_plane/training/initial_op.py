"""Seq 0 of a run created through the Loops API (Tinker clients send their own): a fresh
LoRA adapter (attention and MLP, as Loops trains them), or the adapter of the checkpoint the run
resumes (``path``: with its optimizer state) or starts from (``base_checkpoint``: fresh
optimizer). Either carries the run's activation checkpointing mode (None: the worker's default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Checkpoint, Run
from control_plane.services.runs import LOOPS_LORA_TARGETS
from control_plane.training.queue import TrainerQueue
from data_plane.wire import op_bodies
from data_plane.wire.paths import parse_checkpoint_path
from data_plane.wire.queue import OpKind

if TYPE_CHECKING:
    from control_plane.runtime import Runtime


async def enqueue_initial_op(r: Runtime, s: AsyncSession, run: Run) -> str:
    queue = TrainerQueue(r.redis)
    start = run.init_path or run.base_checkpoint
    if start:
        ref = parse_checkpoint_path(start)
        ckpt = (
            await s.execute(
                select(Checkpoint).where(
                    Checkpoint.run_id == ref.run_id, Checkpoint.kind == ref.kind, Checkpoint.name == ref.name
                )
            )
        ).scalar_one()
        body = op_bodies.encode(
            op_bodies.LoadWeightsBody(
                storage_prefix=ckpt.storage_prefix,
                tinker_path=ref.tinker_path,
                optimizer=bool(run.init_path),
                activation_checkpointing=run.activation_checkpointing,
            )
        )
        kind = OpKind.LOAD_WEIGHTS
    else:
        body = op_bodies.encode(
            op_bodies.CreateBody(
                lora=op_bodies.LoraSpec(rank=run.lora_rank, seed=run.seed, **LOOPS_LORA_TARGETS),
                activation_checkpointing=run.activation_checkpointing,
            )
        )
        kind = OpKind.CREATE
    rid, _ = await queue.submit(run.id, run.id, 0, kind, body, org_id=run.org_id)
    return rid
