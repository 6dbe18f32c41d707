"""Submitting ops to trainer workers and reading futures (control-plane side of
data_plane/wire/queue.py)."""

from __future__ import annotations

import redis.asyncio as aioredis

from control_plane.ids import new_request_id
from control_plane.training.inflight import admit_future
from data_plane.wire import queue as q

# KEYS: seq claim, future, pending set, ops stream
# ARGV: request_id, ttl, model_id, seq_id, kind, body, org_id
_SUBMIT = """
local prev = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'GET', 'EX', ARGV[2])
if prev then return prev end
redis.call('HSET', KEYS[2], 'state', 'pending', 'org', ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'request_id', ARGV[1], 'model_id', ARGV[3], 'seq_id', ARGV[4], 'kind', ARGV[5], 'body', ARGV[6])
return ARGV[1]
"""


async def read_future(redis: aioredis.Redis, request_id: str, org_id: str | None = None) -> q.FutureResult | None:
    """The stored future; ``None`` if unknown, expired, or (when ``org_id`` is given) recorded
    for another org: one org cannot even learn that another's future exists."""
    fields = q.fields_of(await redis.hgetall(q.future_key(request_id)))
    if b"state" not in fields:
        return None
    owner = fields.get(b"org", b"").decode()
    if org_id is not None and owner and owner != org_id:
        return None
    return q.FutureResult.from_fields(fields)


async def read_hash(redis: aioredis.Redis, key: str) -> dict[str, str]:
    """A Redis hash with its fields and values decoded (worker and run state)."""
    raw = q.fields_of(await redis.hgetall(key))
    return {k.decode(): v.decode() for k, v in raw.items()}


ENDED_TTL_SECONDS = 7 * 24 * 3600  # past it, an op to the run is refused by its row's status


def run_ended_key(run_id: str) -> str:
    """Set (to the reason) once a run has ended: see :meth:`TrainerQueue.end_run`."""
    return f"{q.PREFIX}:run-ended:{run_id}"


class TrainerQueue:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._submit = redis.register_script(_SUBMIT)

    async def submit(
        self,
        run_id: str,
        model_id: str,
        seq_id: int,
        kind: q.OpKind,
        body: bytes,
        *,
        org_id: str = "",
        max_inflight: int | None = None,
    ) -> tuple[str, bool]:
        """Enqueue an op once per ``(model_id, seq_id)``. Returns ``(request_id, is_new)``:
        a repeated submission gets the first submission's request id back. ``org_id`` is
        recorded on the future so that only that org can retrieve it; with ``max_inflight``
        the org's futures in flight are limited (:mod:`.inflight`)."""
        rid = new_request_id()
        if max_inflight is not None and org_id:
            await admit_future(self._redis, org_id, rid, max_inflight)
        got = await self._submit(
            keys=[
                q.seq_claim_key(model_id, seq_id),
                q.future_key(rid),
                q.run_pending_key(run_id),
                q.ops_stream(run_id),
            ],
            args=[rid, q.FUTURE_TTL_SECONDS, model_id, seq_id, kind.value, body, org_id],
        )
        got = got.decode() if isinstance(got, bytes) else str(got)
        return got, got == rid

    async def complete(self, run_id: str | None, request_id: str, result: q.FutureResult) -> None:
        key = q.future_key(request_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=result.to_fields())
            pipe.expire(key, q.FUTURE_TTL_SECONDS)
            if run_id:
                pipe.srem(q.run_pending_key(run_id), request_id)
            pipe.publish(q.FUTURE_DONE_CHANNEL, request_id)
            await pipe.execute()

    async def claimed(self, model_id: str, seq_id: int) -> str | None:
        """The request id already holding ``(model_id, seq_id)``, if any."""
        got = await self._redis.get(q.seq_claim_key(model_id, seq_id))
        return q.text(got) if got is not None else None

    async def create_future(
        self, request_id: str, run_id: str | None = None, *, org_id: str = "", max_inflight: int | None = None
    ) -> None:
        """A pending future not backed by a worker op (e.g. sampling); with ``max_inflight``
        the org's futures in flight are limited (:mod:`.inflight`)."""
        if max_inflight is not None and org_id:
            await admit_future(self._redis, org_id, request_id, max_inflight)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(q.future_key(request_id), mapping={"state": q.FutureState.PENDING.value, "org": org_id})
            pipe.expire(q.future_key(request_id), q.FUTURE_TTL_SECONDS)
            if run_id:
                pipe.sadd(q.run_pending_key(run_id), request_id)
            await pipe.execute()

    async def read(self, request_id: str, org_id: str | None = None) -> q.FutureResult | None:
        return await read_future(self._redis, request_id, org_id)

    async def end_run(self, run_id: str, message: str) -> int:
        """The run ended (its row is INACTIVE or FAILED, committed): its pending futures fail
        with ``message``, and so does every op submitted from now on (:meth:`fail_if_ended`).
        The mark goes first: an op added to the pending set after the sweep sees it."""
        await self._redis.set(run_ended_key(run_id), message, ex=ENDED_TTL_SECONDS)
        return await self.fail_pending(run_id, message)

    async def fail_if_ended(self, run_id: str, request_id: str) -> bool:
        """After an op joined the run's pending set: fail it at once if the run ended (closes
        the race with :meth:`end_run`'s sweep, without a database read on the hot path)."""
        raw = await self._redis.get(run_ended_key(run_id))
        if raw is None:
            return False
        await self.complete(run_id, request_id, q.FutureResult.failed(q.text(raw), q.ErrorCategory.SERVER))
        return True

    async def fail_pending(self, run_id: str, message: str) -> int:
        """Resolve every pending future of a run with a server error (its worker is gone)."""
        ids = await self._redis.smembers(q.run_pending_key(run_id))
        failed = q.FutureResult.failed(message, q.ErrorCategory.SERVER)
        n = 0
        for raw in ids:
            rid = q.text(raw)
            cur = await self.read(rid)
            if cur is None or cur.state == q.FutureState.PENDING:
                await self.complete(run_id, rid, failed)
                n += 1
            else:
                await self._redis.srem(q.run_pending_key(run_id), rid)
        return n
