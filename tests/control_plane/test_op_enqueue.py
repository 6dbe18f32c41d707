"""The op path's Redis shapes between our own processes: one enqueue script per op (repeat,
admission, end-of-run mark and enqueue in one round trip), and answers that ride in their
wake-up message when they are small (a large one is read from the future's hash)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from control_plane.errors import LimitExceeded
from control_plane.training.futures import FutureWaiter
from control_plane.training.inflight import inflight_key
from control_plane.training.loops_queue import LoopsQueue, Submitted
from control_plane.training.queue import TrainerQueue, run_ended_key
from data_plane.wire import queue as q
from tests.conftest import TestServices


@pytest.fixture
async def redis(clean_state: None, services: TestServices) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(services.redis_url)
    yield r
    await r.aclose()


# ---- the wake-up message ---------------------------------------------------------------


def test_a_small_answer_rides_in_its_message_and_a_large_one_does_not() -> None:
    small = q.FutureResult.ok_proto(b"\x00\n\x01 binary\nwith newlines")
    rid, got = q.parse_done_message(q.done_message("req-1", small))
    assert rid == "req-1" and got == small
    failed = q.FutureResult.failed("no such checkpoint", q.ErrorCategory.USER)
    assert q.parse_done_message(q.done_message("req-2", failed)) == ("req-2", failed)
    empty = q.FutureResult(q.FutureState.DONE, q.JSON_CONTENT, b"")
    assert q.parse_done_message(q.done_message("req-3", empty)) == ("req-3", empty)
    large = q.FutureResult.ok_proto(b"x" * (q.INLINE_RESULT_MAX_BYTES + 1))
    assert q.done_message("req-4", large) == b"req-4"
    assert q.parse_done_message(b"req-4") == ("req-4", None)
    at_cap = q.FutureResult.ok_proto(b"y" * q.INLINE_RESULT_MAX_BYTES)
    assert q.parse_done_message(q.done_message("req-5", at_cap))[1] == at_cap


async def _waiting(waiter: FutureWaiter, rid: str, org: str | None) -> asyncio.Task[q.FutureResult | None]:
    task = asyncio.create_task(waiter.wait(rid, 10, org_id=org))
    for _ in range(200):  # until the poll has read the pending hash and waits
        if waiter._waiters.get(rid) and not task.done():
            await asyncio.sleep(0.05)
            return task
        await asyncio.sleep(0.01)
    raise AssertionError("the poll never started waiting")


async def test_a_poll_answers_from_the_message_without_reading_the_hash(redis: aioredis.Redis) -> None:
    queue, waiter = TrainerQueue(redis), FutureWaiter(redis)
    try:
        await queue.create_future("req-fast", org_id="org-a")
        task = await _waiting(waiter, "req-fast", "org-a")
        # a message whose copy differs from the hash (which still says pending) shows which
        # one the poll answered with
        copy = q.FutureResult.ok_json({"from": "message"})
        await redis.publish(q.FUTURE_DONE_CHANNEL, q.done_message("req-fast", copy))
        assert await asyncio.wait_for(task, 5) == copy
    finally:
        await waiter.close()


async def test_a_large_answer_is_read_from_the_hash(redis: aioredis.Redis) -> None:
    queue, waiter = TrainerQueue(redis), FutureWaiter(redis)
    try:
        await queue.create_future("req-big", run_id="run-1", org_id="org-a")
        task = await _waiting(waiter, "req-big", "org-a")
        big = q.FutureResult.ok_proto(bytes(range(256)) * (q.INLINE_RESULT_MAX_BYTES // 128))
        await queue.complete("run-1", "req-big", big)  # hash, then the bare id
        assert await asyncio.wait_for(task, 5) == big
        assert not await redis.sismember(q.run_pending_key("run-1"), "req-big")
    finally:
        await waiter.close()


async def test_another_orgs_poll_learns_nothing_from_a_message(redis: aioredis.Redis) -> None:
    queue, waiter = TrainerQueue(redis), FutureWaiter(redis)
    try:
        await queue.create_future("req-org", org_id="org-a")
        assert await waiter.wait("req-org", 0.2, org_id="org-b") is None  # the hash's answer, at once
        task = await _waiting(waiter, "req-org", "org-a")
        await queue.complete(None, "req-org", q.FutureResult.ok_json({"ok": 1}))
        got = await asyncio.wait_for(task, 5)
        assert got is not None and got.body == b'{"ok": 1}'
    finally:
        await waiter.close()


# ---- the Tinker enqueue ----------------------------------------------------------------


async def test_a_tinker_op_is_claimed_counted_and_enqueued_in_one_script(redis: aioredis.Redis) -> None:
    queue = TrainerQueue(redis)
    rid, new = await queue.submit("run-1", "run-1", 1, q.OpKind.OPTIM_STEP, b"{}", org_id="org-a", max_inflight=2)
    assert new
    assert (await redis.hgetall(q.future_key(rid)))[b"state"] == b"pending"
    assert await redis.sismember(q.run_pending_key("run-1"), rid)
    assert await redis.xlen(q.ops_stream("run-1")) == 1
    assert await redis.zscore(inflight_key("org-a"), rid) is not None
    # a repeat: the first request id, nothing enqueued or counted again
    again, new = await queue.submit("run-1", "run-1", 1, q.OpKind.OPTIM_STEP, b"{}", org_id="org-a", max_inflight=2)
    assert (again, new) == (rid, False)
    assert await redis.xlen(q.ops_stream("run-1")) == 1 and await redis.zcard(inflight_key("org-a")) == 1
    # a full org: refused with nothing claimed, so the same op goes through once there is room
    await queue.submit("run-1", "run-1", 2, q.OpKind.OPTIM_STEP, b"{}", org_id="org-a", max_inflight=2)
    with pytest.raises(LimitExceeded) as refused:
        await queue.submit("run-1", "run-1", 3, q.OpKind.OPTIM_STEP, b"{}", org_id="org-a", max_inflight=2)
    assert "2 training ops and samples in flight" in refused.value.message
    assert await queue.claimed("run-1", 3) is None and await redis.xlen(q.ops_stream("run-1")) == 2
    rid3, new = await queue.submit("run-1", "run-1", 3, q.OpKind.OPTIM_STEP, b"{}", org_id="org-a", max_inflight=3)
    assert new and await queue.claimed("run-1", 3) == rid3
    # another org, and no limit at all, count nothing here
    await queue.submit("run-2", "run-2", 1, q.OpKind.OPTIM_STEP, b"{}", org_id="org-b", max_inflight=2)
    await queue.submit("run-3", "run-3", 1, q.OpKind.OPTIM_STEP, b"{}", org_id="org-a")
    assert await redis.zcard(inflight_key("org-a")) == 3


async def test_an_op_of_an_ended_run_fails_at_once_and_is_not_enqueued(redis: aioredis.Redis) -> None:
    queue = TrainerQueue(redis)
    await redis.set(run_ended_key("run-1"), "run run-1 was deactivated")
    rid, new = await queue.submit("run-1", "run-1", 4, q.OpKind.OPTIM_STEP, b"{}", org_id="org-a")
    assert new
    got = await queue.read(rid, "org-a")
    assert got is not None and got.state == q.FutureState.FAILED and got.category == q.ErrorCategory.SERVER
    assert b"run run-1 was deactivated" in got.body
    assert await redis.xlen(q.ops_stream("run-1")) == 0
    assert not await redis.sismember(q.run_pending_key("run-1"), rid)
    # its retry is the same (failed) future
    assert await queue.submit("run-1", "run-1", 4, q.OpKind.OPTIM_STEP, b"{}", org_id="org-a") == (rid, False)


# ---- the Loops enqueue -----------------------------------------------------------------


async def _loops_submit(queue: LoopsQueue, op_id: str, seq: int, max_inflight: int | None = None) -> Submitted:
    return await queue.submit(
        run_id="run-l",
        operation_id=op_id,
        seq_id=seq,
        kind=q.OpKind.OPTIM_STEP,
        body=b"{}",
        org_id="org-a",
        fingerprint=f"fp-{op_id}",
        starts_client=False,
        max_inflight=max_inflight,
    )


async def test_a_loops_op_is_counted_in_its_script_and_a_refusal_claims_nothing(redis: aioredis.Redis) -> None:
    queue = LoopsQueue(redis)
    first = await _loops_submit(queue, "op-1", 1, max_inflight=1)
    assert await redis.zcard(inflight_key("org-a")) == 1
    # the SDK's retry under the same key: the same operation, not counted again
    assert await _loops_submit(queue, "op-1", 1, max_inflight=1) == Submitted(first.request_id, 1, False)
    with pytest.raises(LimitExceeded):
        await _loops_submit(queue, "op-2", 2, max_inflight=1)
    assert await queue.lookup("run-l", "op-2") is None  # nothing recorded: the retry can go through
    assert await redis.xlen(q.ops_stream("run-l")) == 1
    second = await _loops_submit(queue, "op-2", 2, max_inflight=2)
    assert second.is_new and second.worker_seq == 2


async def test_a_loops_op_of_an_ended_run_fails_at_once(redis: aioredis.Redis) -> None:
    queue, trainer_queue = LoopsQueue(redis), TrainerQueue(redis)
    await redis.set(run_ended_key("run-l"), "the trainer died 3 times in a row")
    sub = await _loops_submit(queue, "op-1", 1)
    got = await trainer_queue.read(sub.request_id, "org-a")
    assert got is not None and got.state == q.FutureState.FAILED and b"died 3 times" in got.body
    assert await redis.xlen(q.ops_stream("run-l")) == 0
    # the retry under the same key finds the same failed operation
    again = await _loops_submit(queue, "op-1", 1)
    assert again.request_id == sub.request_id and not again.is_new
