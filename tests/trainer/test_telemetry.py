"""A real worker's telemetry, stored by the control plane's consumer: the rows hold the losses
the worker answered with, and ops a restarted worker replays are not counted twice."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from control_plane.db.engine import Database
from control_plane.db.models import Org, Run, Session, TrainingMetric
from control_plane.telemetry.consumer import TelemetryConsumer
from data_plane.wire import queue as q
from tests.trainer.conftest import sft_batch

RUN = "run-telemetry"


async def seed_run(db: Database) -> None:
    async with db.transaction() as s:
        s.add(Org(id="org-t", name="telemetry"))
        await s.flush()
        s.add(Session(id="ses-t", org_id="org-t", created_by="u", origin="tinker", status="active"))
        await s.flush()
        s.add(
            Run(
                id=RUN,
                org_id="org-t",
                created_by="u",
                session_id="ses-t",
                origin="tinker",
                name=RUN,
                base_model="openloops/tiny",
                status="ACTIVE",
                lora_rank=8,
                max_seq_len=256,
                scale_down_delay_seconds=60,
            )
        )


async def drain(consumer: TelemetryConsumer, r: aioredis.Redis, want: int) -> None:
    """Poll until ``want`` entries were written (each poll is bounded; the worker may still be
    answering)."""
    for _ in range(200):
        await consumer.poll_once()
        if consumer.written >= want:
            return
    raise AssertionError(f"only {consumer.written} of {want} telemetry entries arrived")


async def metrics_rows(db: Database) -> dict[int, dict]:
    async with db.session() as s:
        rows = (await s.execute(select(TrainingMetric).where(TrainingMetric.run_id == RUN))).scalars().all()
    return {row.step: row.metrics for row in rows}


@pytest.mark.usefixtures("clean_state")
async def test_worker_ops_become_step_rows_with_the_answered_loss(services, start_worker, valkey_url):
    db = Database(services.database_url)
    r = aioredis.Redis.from_url(valkey_url)
    await r.delete(q.TELEMETRY_STREAM)
    try:
        await seed_run(db)
        consumer = TelemetryConsumer(db, r, batch_size=100, batch_ms=100, name="test")
        await consumer.ensure_group()
        # no snapshot before the kill: the restarted worker replays every op from its log
        a = start_worker(RUN, snapshot_interval_s=3600, snapshot_max_ops=1000)
        a.wait_state("ready")
        a.ok_json(a.create())
        out1 = await asyncio.to_thread(a.ok_proto, a.fwd(sft_batch(1)))
        out2 = await asyncio.to_thread(a.ok_proto, a.fwd(sft_batch(2)))
        step1 = await asyncio.to_thread(a.ok_json, a.optim(learning_rate=0.05))
        out3 = await asyncio.to_thread(a.ok_proto, a.fwd(sft_batch(3)))
        await drain(consumer, r, 4)
        rows = await metrics_rows(db)
        assert sorted(rows) == [1, 2]
        m1 = rows[1]
        assert m1["loss:sum"] == pytest.approx(out1.metrics["loss:sum"] + out2.metrics["loss:sum"], rel=1e-6)
        assert m1["num_tokens:sum"] == out1.metrics["num_tokens:sum"] + out2.metrics["num_tokens:sum"]
        assert m1["tokens"] == m1["num_tokens:sum"] > 0
        assert m1["learning_rate"] == 0.05
        assert m1["grad_norm"] == pytest.approx(step1["metrics"]["grad_norm:mean"])
        assert m1["ops"] == 3 and m1["step_time_s"] > 0 and m1["tokens_per_s"] > 0
        assert rows[2]["loss:sum"] == pytest.approx(out3.metrics["loss:sum"], rel=1e-6)

        # the worker dies; a new one replays seqs 0..4 (their answers are out) and goes on
        a.proc.kill()
        a.proc.wait()
        b = start_worker(RUN, snapshot_interval_s=3600, snapshot_max_ops=1000)
        b.seq, b._n = a.seq, a._n
        b.wait_state("ready")
        await asyncio.to_thread(b.ok_json, b.optim(learning_rate=0.05))
        await drain(consumer, r, 5)
        assert "(replayed)" in b.logs()
        assert consumer.written == 5  # the replayed ops wrote no telemetry: their answers were out
        rows = await metrics_rows(db)
        assert rows[1] == m1  # the replay added nothing
        assert rows[2]["loss:sum"] == pytest.approx(out3.metrics["loss:sum"], rel=1e-6)
        assert rows[2]["ops"] == 2 and rows[2]["learning_rate"] == 0.05
        assert await r.xlen(q.TELEMETRY_STREAM) == 0
    finally:
        await r.aclose()
        await db.close()
