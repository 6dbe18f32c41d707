"""Stores the trainers' telemetry entries (``TELEMETRY_STREAM``) as per-step rows, in batches.

Every API process runs one consumer in the ``TELEMETRY_GROUP`` consumer group, started next to
the :class:`~control_plane.training.completions.CompletionConsumer`. A poll gathers up to
``telemetry_batch_size`` entries for at most ``telemetry_batch_ms`` (entries that another
consumer read and left unacknowledged for :data:`CLAIM_IDLE_MS` first: it died mid-batch),
writes them in one transaction (:func:`~control_plane.telemetry.store.write_batch`) and only
then acknowledges and deletes them. A consumer that dies before its commit leaves its entries
pending, and another one claims them; one that dies after its commit but before acknowledging
makes another one write them again, which changes nothing (a row counts each op seq once).
Nothing here is on a request's path: trainers only ``XADD`` in the round trip that answers the
op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from control_plane.db.engine import Database
from control_plane.telemetry.store import write_batch
from control_plane.training.consumer_groups import ensure_group, poll_forever
from data_plane.wire import queue as q
from data_plane.wire.telemetry import OpTelemetry

log = structlog.get_logger("openloops.telemetry")

CLAIM_IDLE_MS = 30_000


@dataclass
class Batch:
    entry_ids: list[Any]
    ops: list[OpTelemetry]


class TelemetryConsumer:
    def __init__(
        self,
        db: Database,
        redis: aioredis.Redis,
        *,
        batch_size: int,
        batch_ms: int,
        name: str | None = None,
        claim_idle_ms: int = CLAIM_IDLE_MS,
    ) -> None:
        self.db = db
        self.redis = redis
        self.batch_size = batch_size
        self.batch_ms = batch_ms
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self.written = 0  # entries written and acknowledged by this consumer

    async def ensure_group(self) -> None:
        await ensure_group(self.redis, q.TELEMETRY_STREAM, q.TELEMETRY_GROUP)

    async def run_forever(self, stop: asyncio.Event) -> None:
        await poll_forever(self.ensure_group, self.poll_once, stop, log, "telemetry consumer")

    async def poll_once(self) -> int:
        """Read one batch, write it, acknowledge it. Returns how many entries it held."""
        batch = await self.read()
        await self.write(batch)
        return len(batch.entry_ids)

    async def read(self) -> Batch:
        """Gather a batch: stale entries of dead consumers, then new ones for ``batch_ms`` once
        the first arrived (the first read blocks up to ``batch_ms`` too). Once one has arrived
        the rest are taken in one read when the window closes, not one read per entry: a
        training loop of small ops answers tens of ops a second, each with an entry."""
        batch = Batch([], [])
        _next, claimed, *_ = await self.redis.xautoclaim(
            q.TELEMETRY_STREAM, q.TELEMETRY_GROUP, self.name, min_idle_time=self.claim_idle_ms, count=self.batch_size
        )
        self._add(batch, q.stream_entries(claimed))
        if not batch.entry_ids:
            self._add(batch, await self._take(self.batch_size, block_ms=self.batch_ms))
            if not batch.entry_ids:
                return batch
        if len(batch.entry_ids) < self.batch_size:
            await asyncio.sleep(self.batch_ms / 1000)
            self._add(batch, await self._take(self.batch_size - len(batch.entry_ids), block_ms=None))
        return batch

    async def _take(self, count: int, *, block_ms: int | None) -> list[q.StreamEntry]:
        resp = await self.redis.xreadgroup(
            q.TELEMETRY_GROUP, self.name, {q.TELEMETRY_STREAM: ">"}, count=count, block=block_ms
        )
        return [e for _stream, entries in q.xread_streams(resp) for e in entries]

    def _add(self, batch: Batch, entries: list[q.StreamEntry]) -> None:
        for entry_id, fields in entries:
            batch.entry_ids.append(entry_id)
            if not fields:
                continue  # deleted meanwhile (trimmed): only acknowledge it
            try:
                batch.ops.append(OpTelemetry.from_fields(fields))
            except Exception as exc:  # noqa: BLE001 - a malformed entry must not block the stream
                log.error("dropping malformed telemetry entry", entry=str(entry_id), error=str(exc))

    async def write(self, batch: Batch) -> None:
        if not batch.entry_ids:
            return
        await write_batch(self.db, batch.ops)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(q.TELEMETRY_STREAM, q.TELEMETRY_GROUP, *batch.entry_ids)
            pipe.xdel(q.TELEMETRY_STREAM, *batch.entry_ids)
            await pipe.execute()
        self.written += len(batch.entry_ids)
