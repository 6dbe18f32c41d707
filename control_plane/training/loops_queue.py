"""Submitting Loops data-plane ops: idempotency keys and the client's seq ids.

The Loops SDK names every op with an ``Idempotency-Key`` (reused by its retries; it is also
the ``operation_id`` the server answers with) and numbers its ops with ``seq_id`` from 1 (seq
0 of a run is the creating op the server enqueued with the run). One Lua script, atomically:

1. a key seen before is the same operation: its request id comes back, nothing is enqueued
   (a different body under the same key is a conflict);
2. the op's worker seq is ``base + seq_id``. ``base`` starts at 0; a second client on the same
   run (a new ``TrainingClient``, which always starts with ``init_trainer_server`` at seq 1)
   finds that slot used (claimed, or already executed by the worker) and starts a new epoch:
   ``base`` becomes the highest seq used so far;
3. the org's futures in flight are counted (:mod:`.inflight`; a full org is refused before
   anything is claimed);
4. the worker seq is claimed (the claim is shared with the Tinker path), the future created
   as pending and the key recorded; unless the run has ended (the mark
   :meth:`TrainerQueue.end_run` sets: the future is then failed with its reason), the op is
   appended to the run's stream.

Everything expires with the futures (:data:`data_plane.wire.queue.FUTURE_TTL_SECONDS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from control_plane.ids import new_request_id
from control_plane.training.inflight import admission, admit_lua, refused
from control_plane.training.queue import TrainerQueue, run_ended_key
from data_plane.wire import queue as q

# KEYS: op key, run meta, pending set, ops stream, future, run state (the worker's progress),
#       run-ended mark, then admission's two
# ARGV: request_id, ttl, run_id, seq_id, kind, body, org_id, dialect, fingerprint, is_init, claim prefix,
#       then admission's six
_SUBMIT = (
    """
local prev = redis.call('GET', KEYS[1])
if prev then return {'dup', prev} end
local seq = tonumber(ARGV[4])
local base = tonumber(redis.call('HGET', KEYS[2], 'base') or '0')
local wseq = base + seq
if ARGV[10] == '1' then
  local used = math.max(tonumber(redis.call('HGET', KEYS[2], 'maxseq') or '0'),
                        tonumber(redis.call('HGET', KEYS[6], 'next_seq') or '0') - 1)
  if wseq <= used or redis.call('EXISTS', ARGV[11] .. wseq) == 1 then
    base = used
    wseq = base + seq
    redis.call('HSET', KEYS[2], 'base', base)
  end
end
if redis.call('EXISTS', ARGV[11] .. wseq) == 1 then
  return {'conflict', tostring(wseq)}
end
"""
    + admit_lua(8, 12)
    + """
if adm_full then return {'full', tostring(adm_full)} end
redis.call('SET', ARGV[11] .. wseq, ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[5], 'state', 'pending', 'org', ARGV[7])
redis.call('EXPIRE', KEYS[5], ARGV[2])
local rec = ARGV[1] .. '|' .. ARGV[9] .. '|' .. wseq
redis.call('SET', KEYS[1], rec, 'EX', ARGV[2])
local ended = redis.call('GET', KEYS[7])
if ended then return {'ended', rec, ended} end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'request_id', ARGV[1], 'model_id', ARGV[3], 'seq_id', wseq, 'kind', ARGV[5],
           'body', ARGV[6], 'dialect', ARGV[8])
if wseq > tonumber(redis.call('HGET', KEYS[2], 'maxseq') or '0') then redis.call('HSET', KEYS[2], 'maxseq', wseq) end
return {'new', rec}
"""
)


def op_key(run_id: str, operation_id: str) -> str:
    return f"{q.PREFIX}:loops-op:{run_id}:{operation_id}"


def run_meta_key(run_id: str) -> str:
    return f"{q.PREFIX}:loops-run:{run_id}"


@dataclass(frozen=True, slots=True)
class Submitted:
    request_id: str
    worker_seq: int
    is_new: bool


class KeyReused(Exception):
    """The idempotency key names an earlier operation with another body."""


class SeqTaken(Exception):
    """The op's seq slot belongs to another operation."""

    def __init__(self, worker_seq: int) -> None:
        super().__init__(worker_seq)
        self.worker_seq = worker_seq


class LoopsQueue:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._submit = redis.register_script(_SUBMIT)

    async def submit(
        self,
        *,
        run_id: str,
        operation_id: str,
        seq_id: int,
        kind: q.OpKind,
        body: bytes,
        org_id: str,
        fingerprint: str,
        starts_client: bool,
        max_inflight: int | None = None,
    ) -> Submitted:
        rid = new_request_id()
        adm_keys, adm_args = admission(org_id, rid, max_inflight)
        status, rec, *ended = await self._submit(
            keys=[
                op_key(run_id, operation_id),
                run_meta_key(run_id),
                q.run_pending_key(run_id),
                q.ops_stream(run_id),
                q.future_key(rid),
                q.run_state_key(run_id),
                run_ended_key(run_id),
                *adm_keys,
            ],
            args=[
                rid,
                q.FUTURE_TTL_SECONDS,
                run_id,
                seq_id,
                kind.value,
                body,
                org_id,
                q.Dialect.LOOPS.value,
                fingerprint,
                "1" if starts_client else "0",
                q.seq_claim_key(run_id, 0)[:-1],
                *adm_args,
            ],
        )
        status, rec = q.text(status), q.text(rec)
        if status == "conflict":
            raise SeqTaken(int(rec))
        if status == "full":
            raise refused(int(rec), max_inflight)
        got_rid, got_fp, wseq = rec.split("|")
        if status == "dup" and got_fp != fingerprint:
            raise KeyReused(operation_id)
        if status == "ended":
            await TrainerQueue(self._redis).complete(
                run_id, rid, q.FutureResult.failed(q.text(ended[0]), q.ErrorCategory.SERVER)
            )
        return Submitted(got_rid, int(wseq), status != "dup")

    async def lookup(self, run_id: str, operation_id: str) -> tuple[str, str] | None:
        """``(request_id, fingerprint)`` of ``operation_id`` of ``run_id`` (None: unknown or
        expired)."""
        rec = await self._redis.get(op_key(run_id, operation_id))
        if rec is None:
            return None
        rid, fp, _seq = q.text(rec).split("|")
        return rid, fp

    async def request_id(self, run_id: str, operation_id: str) -> str | None:
        """The request id behind ``operation_id`` of ``run_id`` (None: unknown or expired)."""
        found = await self.lookup(run_id, operation_id)
        return found[0] if found is not None else None
