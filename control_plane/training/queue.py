"""Submitting ops to trainer workers and reading futures (control-plane side of
data_plane/wire/queue.py)."""

from __future__ import annotations

import redis.asyncio as aioredis

from control_plane.ids import new_request_id
from control_plane.training.inflight import admission, admit_future, admit_lua, refused
from data_plane.wire import queue as q

# KEYS: seq claim, future, pending set, ops stream, run-ended mark, then admission's two
# ARGV: request_id, ttl, model_id, seq_id, kind, body, org_id, then admission's six
# One round trip: a repeat returns the first request id (nothing counted); a full org is
# refused before anything is claimed; an op of a run that ended is claimed with a pending
# future but not enqueued (the caller fails the future with the mark's reason).
_SUBMIT = (
    """
local prev = redis.call('GET', KEYS[1])
if prev then return {'repeat', prev} end
"""
    + admit_lua(6, 8)
    + """
if adm_full then return {'full', tostring(adm_full)} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'pending', 'org', ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[2])
local ended = redis.call('GET', KEYS[5])
if ended then return {'ended', ended} end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'request_id', ARGV[1], 'model_id', ARGV[3], 'seq_id', ARGV[4], 'kind', ARGV[5], 'body', ARGV[6])
return {'new', ARGV[1]}
"""
)


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
        the org's futures in flight are limited (:mod:`.inflight`). An op of a run that ended
        (:meth:`end_run`) gets its future failed at once with the end's reason."""
        rid = new_request_id()
        adm_keys, adm_args = admission(org_id, rid, max_inflight)
        status, got = await self._submit(
            keys=[
                q.seq_claim_key(model_id, seq_id),
                q.future_key(rid),
                q.run_pending_key(run_id),
                q.ops_stream(run_id),
                run_ended_key(run_id),
                *adm_keys,
            ],
            args=[rid, q.FUTURE_TTL_SECONDS, model_id, seq_id, kind.value, body, org_id, *adm_args],
        )
        status, got = q.text(status), q.text(got)
        if status == "full":
            raise refused(int(got), max_inflight)
        if status == "ended":
            await self.complete(run_id, rid, q.FutureResult.failed(got, q.ErrorCategory.SERVER))
            return rid, True
        return got, status == "new"

    async def complete(self, run_id: str | None, request_id: str, result: q.FutureResult) -> None:
        key = q.future_key(request_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=result.to_fields())
            pipe.expire(key, q.FUTURE_TTL_SECONDS)
            if run_id:
                pipe.srem(q.run_pending_key(run_id), request_id)
            pipe.publish(q.FUTURE_DONE_CHANNEL, q.done_message(request_id, result))
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
        with ``message``, and so does every op submitted from now on. The mark goes first and
        the enqueue scripts read it in the same atomic step that joins the pending set, so an
        op either sees the mark or is in the set this sweep reads: no database read on an op's
        path closes the race with a run that ends."""
        await self._redis.set(run_ended_key(run_id), message, ex=ENDED_TTL_SECONDS)
        return await self.fail_pending(run_id, message)

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
