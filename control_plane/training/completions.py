"""Finalizes checkpoint-producing ops: the row first, then the future.

Trainer workers append a :class:`Completion` to ``COMPLETIONS_STREAM`` after writing a
checkpoint's files. Every API process runs one consumer in the ``COMPLETIONS_GROUP`` consumer
group, so each completion is handled once; one whose consumer died is claimed by another
after :data:`CLAIM_IDLE_MS`. Handling is idempotent (the row is upserted by
``(run, kind, name)``), which makes at-least-once delivery safe. A client therefore never
gets a path back before that checkpoint is listed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Checkpoint, Run, Sampler
from control_plane.errors import CapacityExceeded
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services.capacity import CapacityPolicy, reserving
from control_plane.services.sampling_sessions import open_sampling_session
from control_plane.training.consumer_groups import ensure_group, poll_forever
from control_plane.training.queue import TrainerQueue
from data_plane.wire import queue as q

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

log = structlog.get_logger("openloops.completions")

CLAIM_IDLE_MS = 30_000
READ_BLOCK_MS = 1000
READ_COUNT = 16


def snapshot_name(seq: int | None) -> str:
    """The checkpoint name of an unnamed sampler save (one per sampling session seq id)."""
    return f"snapshot-{seq}"


class CompletionConsumer:
    def __init__(self, runtime: Runtime, consumer_name: str | None = None) -> None:
        self.r = runtime
        self.queue = TrainerQueue(runtime.redis)
        self.name = consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.handled = 0

    async def ensure_group(self) -> None:
        await ensure_group(self.r.redis, q.COMPLETIONS_STREAM, q.COMPLETIONS_GROUP)

    async def run_forever(self, stop: asyncio.Event) -> None:
        await poll_forever(self.ensure_group, self.poll_once, stop, log, "completion consumer")

    async def poll_once(self, block_ms: int = READ_BLOCK_MS) -> int:
        """Handle stale entries of dead consumers, then new ones. Returns how many were handled."""
        n = 0
        _next, claimed, *_ = await self.r.redis.xautoclaim(
            q.COMPLETIONS_STREAM, q.COMPLETIONS_GROUP, self.name, min_idle_time=CLAIM_IDLE_MS, count=READ_COUNT
        )
        for entry_id, fields in q.stream_entries(claimed):
            if fields:
                await self._handle_entry(entry_id, fields)
                n += 1
        resp = await self.r.redis.xreadgroup(
            q.COMPLETIONS_GROUP, self.name, {q.COMPLETIONS_STREAM: ">"}, count=READ_COUNT, block=block_ms
        )
        for _stream, entries in q.xread_streams(resp):
            for entry_id, fields in entries:
                await self._handle_entry(entry_id, fields)
                n += 1
        return n

    async def _handle_entry(self, entry_id: Any, fields: dict[bytes, bytes]) -> None:
        try:
            c = q.Completion.from_fields(fields)
        except Exception as exc:  # noqa: BLE001 - a malformed entry must not block the stream
            log.error("dropping malformed completion", entry=str(entry_id), error=str(exc))
        else:
            await self.handle(c)
        async with self.r.redis.pipeline(transaction=True) as pipe:
            pipe.xack(q.COMPLETIONS_STREAM, q.COMPLETIONS_GROUP, entry_id)
            pipe.xdel(q.COMPLETIONS_STREAM, entry_id)
            await pipe.execute()
        self.handled += 1

    async def handle(self, c: q.Completion) -> None:
        if c.error is not None:
            await self.queue.complete(
                c.run_id, c.request_id, q.FutureResult.failed(c.error, c.category or q.ErrorCategory.SERVER)
            )
            return
        result = dict(c.result)
        async with self.r.db.transaction() as s:
            run = await s.get(Run, c.run_id)
            if run is None:
                failed = q.FutureResult.failed(f"run {c.run_id!r} no longer exists", q.ErrorCategory.SERVER)
                await self.queue.complete(c.run_id, c.request_id, failed)
                return
            kind = c.checkpoint_kind or "weights"
            name = c.checkpoint_name or snapshot_name(c.sampling_session_seq_id)
            ckpt = await ckpt_svc.record_checkpoint(
                s,
                run,
                kind=kind,
                name=name,
                storage_prefix=c.storage_prefix or "",
                files=[(f.relative_path, f.size_bytes) for f in c.files],
                lora_config=c.lora_config,
                user_metadata=c.user_metadata,
                ttl_seconds=c.ttl_seconds,
                policy_version=c.policy_version,
            )
            if c.publish and kind == "sampler_weights":
                # the run's paired sampler serves this adapter from now on (Loops bump_version)
                run.published_checkpoint_id = ckpt.id
                run.policy_version = int(c.policy_version or 0)
            if c.checkpoint_name is None and kind == "sampler_weights":
                sampler = await self._sampling_session(s, run, ckpt, int(c.sampling_session_seq_id or 0))
                result = {"sampling_session_id": sampler.id, "type": "save_weights_for_sampler"}
        await self.queue.complete(c.run_id, c.request_id, q.FutureResult.ok_json(result))
        log.info("checkpoint recorded", run_id=c.run_id, kind=kind, name=name)

    async def _sampling_session(self, s: AsyncSession, run: Run, ckpt: Checkpoint, seq_id: int) -> Sampler:
        """The sampling session of an unnamed save_weights_for_sampler, held to the org's
        capacity like every sampler: when another sampler server would pass the ceiling, the
        session still opens (the save succeeded) but asleep, and its first request wakes it or
        answers 429 ``loops_capacity`` (which the tinker SDK retries) until capacity frees."""
        opening = functools.partial(
            open_sampling_session,
            s,
            org_id=run.org_id,
            created_by=run.created_by,
            session_id=run.session_id,
            seq_id=seq_id,
            base_model=run.base_model,
            checkpoint=ckpt,
        )
        try:
            async with s.begin_nested(), reserving(s, CapacityPolicy.of(self.r.settings, self.r.catalog), run.org_id):
                return await opening()
        except CapacityExceeded as exc:
            return await opening(asleep_because=f"waiting for capacity to wake up: {exc.message}")
