"""Training telemetry: the consumer (batches, idempotence, a consumer that dies mid-batch),
the merge rule, GET /v1/loops/runs/{id}/training_metrics (ranges, pagination, downsampling,
isolation, bad input) and retention. Real Postgres and Redis."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from control_plane.db.models import TrainingMetric
from control_plane.telemetry.consumer import TelemetryConsumer
from control_plane.telemetry.merge import merge
from control_plane.telemetry.retention import prune_training_metrics
from control_plane.telemetry.store import write_batch
from data_plane.wire import queue as q
from data_plane.wire.telemetry import OpTelemetry, TelemetryKind
from tests.control_plane.test_loops_api import new_run, new_session


def fb(run_id: str, seq: int, step: int, loss: float, tokens: int = 10) -> OpTelemetry:
    metrics = {"loss:sum": loss, "num_tokens:sum": float(tokens), "clip:mean": float(seq)}
    return OpTelemetry(run_id, seq, TelemetryKind.FORWARD_BACKWARD, step, time.time(), 0.5, tokens, metrics)


def optim(run_id: str, seq: int, step: int, lr: float = 1e-3) -> OpTelemetry:
    metrics = {"grad_norm:mean": 2.0, "learning_rate:mean": lr, "grad_clipped:mean": 0.0}
    return OpTelemetry(run_id, seq, TelemetryKind.OPTIM_STEP, step, time.time(), 0.5, 0, metrics)


async def run_of(api, org: str = "acme"):
    t = await api.tenant(org)
    run = await new_run(api, t, await new_session(api, t))
    return t, run["id"]


async def rows(api, run_id: str) -> dict[int, dict]:
    async with api.runtime.db.session() as s:
        got = (await s.execute(select(TrainingMetric).where(TrainingMetric.run_id == run_id))).scalars().all()
    return {r.step: r.metrics for r in got}


def consumer(api, name: str, **kw) -> TelemetryConsumer:
    return TelemetryConsumer(api.runtime.db, api.runtime.redis, batch_size=50, batch_ms=50, name=name, **kw)


async def xadd(api, *ops: OpTelemetry) -> None:
    for op in ops:
        await api.runtime.redis.xadd(q.TELEMETRY_STREAM, op.to_fields())


def test_merge_sums_counts_and_keeps_the_last_value_otherwise():
    ops = [fb("r", 1, 1, 3.0, tokens=10), fb("r", 2, 1, 5.0, tokens=30), optim("r", 3, 1, lr=0.01)]
    merged, seqs = merge({}, [], reversed(ops))  # the order of arrival does not matter
    assert seqs == [1, 2, 3]
    assert merged["loss:sum"] == 8.0
    assert merged["num_tokens:sum"] == 40.0 and merged["tokens"] == 40
    assert merged["clip:mean"] == 2.0  # the last forward_backward's
    assert merged["learning_rate"] == 0.01 and merged["grad_norm"] == 2.0
    assert merged["step_time_s"] == 1.5 and merged["ops"] == 3
    assert merged["tokens_per_s"] == pytest.approx(40 / 1.5)
    again, seqs_again = merge(merged, seqs, ops)  # the same ops once more: nothing changes
    assert again == merged and seqs_again == seqs


def test_forward_only_metrics_do_not_mix_with_training_loss():
    ev = OpTelemetry("r", 4, TelemetryKind.FORWARD, 1, time.time(), 0.2, 7, {"loss:sum": 100.0})
    merged, _ = merge({}, [], [fb("r", 1, 1, 3.0), ev])
    assert merged["loss:sum"] == 3.0
    assert merged["forward/loss:sum"] == 100.0 and merged["forward/tokens"] == 7


async def test_consumer_batches_and_is_idempotent(api):
    _t, run_id = await run_of(api)
    ops = [fb(run_id, 1, 1, 1.0), fb(run_id, 2, 1, 2.0), optim(run_id, 3, 1), fb(run_id, 4, 2, 4.0)]
    await xadd(api, *ops)
    c = consumer(api, "a")
    await c.ensure_group()
    assert await c.poll_once() == 4  # one batch
    got = await rows(api, run_id)
    assert sorted(got) == [1, 2]
    assert got[1]["loss:sum"] == 3.0 and got[1]["ops"] == 3
    assert got[2]["loss:sum"] == 4.0
    # the same entries again (a replay, a redelivery): one row per step, nothing counted twice
    await xadd(api, *ops)
    assert await c.poll_once() == 4
    assert await rows(api, run_id) == got
    assert await api.runtime.redis.xlen(q.TELEMETRY_STREAM) == 0  # acknowledged and deleted
    # an entry of a run that does not exist is dropped, not retried forever
    await xadd(api, fb("no-such-run", 1, 1, 1.0))
    assert await c.poll_once() == 1
    assert await api.runtime.redis.xlen(q.TELEMETRY_STREAM) == 0


async def test_entries_arriving_one_by_one_are_taken_in_one_read_per_window(api):
    """A training loop of small ops answers tens of ops a second: the consumer must not wake
    up once per entry."""
    _t, run_id = await run_of(api)
    c = TelemetryConsumer(api.runtime.db, api.runtime.redis, batch_size=50, batch_ms=400, name="w")
    await c.ensure_group()
    reads = 0
    real = api.runtime.redis.xreadgroup

    async def counting(*args, **kw):
        nonlocal reads
        reads += 1
        return await real(*args, **kw)

    async def trickle() -> None:
        for seq in range(1, 11):
            await xadd(api, fb(run_id, seq, 1, 1.0))
            await asyncio.sleep(0.02)

    api.runtime.redis.xreadgroup = counting
    try:
        feeder = asyncio.create_task(trickle())
        batch = await c.read()
        await feeder
    finally:
        del api.runtime.redis.xreadgroup
    assert len(batch.entry_ids) == 10 and reads == 2  # the first entry, then the rest at once
    await c.write(batch)
    assert (await rows(api, run_id))[1]["ops"] == 10


async def test_a_consumer_that_dies_mid_batch_loses_nothing(api):
    _t, run_id = await run_of(api)
    await xadd(api, fb(run_id, 1, 1, 1.0), optim(run_id, 2, 1), fb(run_id, 3, 2, 5.0))
    dead = consumer(api, "dead")
    await dead.ensure_group()
    batch = await dead.read()  # read, then "dies" before writing: the entries stay pending
    assert len(batch.entry_ids) == 3
    assert await rows(api, run_id) == {}
    # a consumer that wrote but died before acknowledging: its entries come back too
    half = consumer(api, "half")
    await xadd(api, fb(run_id, 4, 2, 7.0))
    written = await half.read()
    await write_batch(api.runtime.db, written.ops)
    survivor = consumer(api, "survivor", claim_idle_ms=0)
    assert await survivor.poll_once() == 4  # claims all pending entries
    got = await rows(api, run_id)
    assert got[1]["loss:sum"] == 1.0 and got[1]["ops"] == 2
    assert got[2]["loss:sum"] == 12.0 and got[2]["ops"] == 2  # seq 4 counted once
    pending = await api.runtime.redis.xpending(q.TELEMETRY_STREAM, q.TELEMETRY_GROUP)
    assert pending["pending"] == 0


async def fill(api, run_id: str, steps: range) -> None:
    ops = [fb(run_id, i, i, float(i)) for i in steps]
    await write_batch(api.runtime.db, ops)


async def get_metrics(api, t, run_id: str, **params):
    return await api.client.get(f"/v1/loops/runs/{run_id}/training_metrics", headers=t.headers, params=params)


async def test_ranges_and_a_cursor_walk_every_step_once(api):
    t, run_id = await run_of(api)
    await fill(api, run_id, range(1, 26))
    seen: list[int] = []
    params: dict = {"start_step": 3, "end_step": 22, "limit": 6}
    while True:
        r = await get_metrics(api, t, run_id, **params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["downsampled"] is False
        assert len(body["steps"]) <= 6
        seen += [s["step"] for s in body["steps"]]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert seen == list(range(3, 23))
    r = await get_metrics(api, t, run_id, start_step=5, end_step=5)
    (only,) = r.json()["steps"]
    assert only["step"] == 5 and only["metrics"]["loss:sum"] == 5.0
    assert datetime.fromisoformat(only["time"]).tzinfo is not None


async def test_downsampling_averages_consecutive_buckets(api):
    t, run_id = await run_of(api)
    await fill(api, run_id, range(1, 11))
    r = await get_metrics(api, t, run_id, max_points=3)
    body = r.json()
    assert body["downsampled"] is True and body["next_cursor"] is None
    assert [s["step"] for s in body["steps"]] == [4, 7, 10]  # buckets 1-4, 5-7, 8-10
    assert [s["metrics"]["loss:sum"] for s in body["steps"]] == pytest.approx([2.5, 6.0, 9.0])
    assert [s["metrics"]["tokens"] for s in body["steps"]] == pytest.approx([10, 10, 10])
    # a range within max_points is returned as it is
    r = await get_metrics(api, t, run_id, max_points=10)
    assert r.json()["downsampled"] is False and len(r.json()["steps"]) == 10
    # downsampling applies to the requested range only
    r = await get_metrics(api, t, run_id, start_step=5, end_step=8, max_points=2)
    assert [s["step"] for s in r.json()["steps"]] == [6, 8]
    assert [s["metrics"]["loss:sum"] for s in r.json()["steps"]] == pytest.approx([5.5, 7.5])


async def test_non_numeric_metrics_are_dropped_when_downsampled(api):
    t, run_id = await run_of(api)
    await fill(api, run_id, range(1, 5))
    async with api.runtime.db.transaction() as s:
        rows_ = (await s.execute(select(TrainingMetric).where(TrainingMetric.run_id == run_id))).scalars().all()
        for row in rows_:
            row.metrics = {**row.metrics, "note": "text", "nan": None}
    r = await get_metrics(api, t, run_id, max_points=2)
    for step in r.json()["steps"]:
        assert "note" not in step["metrics"] and "nan" not in step["metrics"]
        assert "loss:sum" in step["metrics"]


async def test_another_orgs_run_is_not_found_and_bad_params_name_their_field(api):
    t, run_id = await run_of(api)
    await fill(api, run_id, range(1, 3))
    other = await api.tenant("globex")
    r = await get_metrics(api, other, run_id)
    assert r.status_code == 404
    assert (await get_metrics(api, t, "no-such-run")).status_code == 404
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 10001}, "limit"),
        ({"max_points": 0}, "max_points"),
        ({"start_step": -1}, "start_step"),
        ({"start_step": 5, "end_step": 2}, "start_step"),
        ({"cursor": "not-a-cursor!"}, "cursor"),
    ):
        r = await get_metrics(api, t, run_id, **params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["field"] == field, (params, r.json())


async def test_retention_deletes_old_rows_only(api):
    _t, run_id = await run_of(api)
    await fill(api, run_id, range(1, 8))
    old = datetime.now(UTC) - timedelta(days=100)
    async with api.runtime.db.transaction() as s:
        await s.execute(
            update(TrainingMetric).where(TrainingMetric.run_id == run_id, TrainingMetric.step <= 5).values(time=old)
        )
    assert await prune_training_metrics(api.runtime.db, 0) == 0  # 0 keeps everything
    assert len(await rows(api, run_id)) == 7
    assert await prune_training_metrics(api.runtime.db, 90, batch=2) == 5  # bounded deletes, all of them
    assert sorted(await rows(api, run_id)) == [6, 7]
