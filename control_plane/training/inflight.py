"""The org guard rail on futures in flight (``max_inflight_futures_per_org``): training ops
(Tinker and Loops) and Tinker samples submitted and not yet answered.

Each admitted future's request id goes into the org's sorted set (scored by admission time)
before the future is created. Answers are written by workers, which know nothing of orgs, so
the set is pruned lazily: only when it is full, members whose future is answered (or gone:
expired, or never created because the submission was a repeat, after a grace period) are
dropped, at most once a second per org (a full org's refusals cost one ZCARD each). Over the
limit the submission is refused with 429 ``limit_exceeded``, ``details.reason`` naming the
setting, before anything is claimed: the SDKs back off and submit the same op again."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from control_plane.errors import LimitExceeded
from data_plane.wire import queue as q

REASON = "max_inflight_futures_per_org"
RETRY_AFTER_S = 2.0
# a member without a future hash is a submission still being written within this long
GRACE_SECONDS = 60
SET_TTL_SECONDS = 2 * q.FUTURE_TTL_SECONDS


def inflight_key(org_id: str) -> str:
    return f"{q.PREFIX}:inflight:{org_id}"


def _pruned_key(org_id: str) -> str:
    return f"{q.PREFIX}:inflight-pruned:{org_id}"


def admit_lua(k: int, a: int) -> str:
    """The admission as a Lua fragment for a script that also enqueues (one round trip): the
    org's set and prune marker are ``KEYS[k]``, ``KEYS[k+1]``; request id, now, limit, grace,
    future key prefix and set TTL are ``ARGV[a]`` .. ``ARGV[a+5]`` (:func:`admission`). It
    leaves ``adm_full`` set to the org's count when the org is full (nothing added), else nil.
    An empty limit admits without counting."""
    return f"""
local adm_full = nil
if ARGV[{a + 2}] ~= '' then
  local adm_limit = tonumber(ARGV[{a + 2}])
  local n = redis.call('ZCARD', KEYS[{k}])
  if n >= adm_limit then
    if redis.call('SET', KEYS[{k + 1}], '1', 'NX', 'PX', 1000) then
      local now = tonumber(ARGV[{a + 1}])
      local members = redis.call('ZRANGE', KEYS[{k}], 0, -1, 'WITHSCORES')
      for i = 1, #members, 2 do
        local state = redis.call('HGET', ARGV[{a + 4}] .. members[i], 'state')
        if (state and state ~= 'pending') or ((not state) and tonumber(members[i + 1]) < now - tonumber(ARGV[{a + 3}])) then
          redis.call('ZREM', KEYS[{k}], members[i])
        end
      end
      n = redis.call('ZCARD', KEYS[{k}])
    end
    if n >= adm_limit then adm_full = n end
  end
  if not adm_full then
    redis.call('ZADD', KEYS[{k}], ARGV[{a + 1}], ARGV[{a}])
    redis.call('EXPIRE', KEYS[{k}], ARGV[{a + 5}])
  end
end
"""


def admission(org_id: str, request_id: str, limit: int | None) -> tuple[list[str], list[str | float | int]]:
    """The keys and arguments :func:`admit_lua` reads (``limit`` None or no org: not counted)."""
    counted = limit is not None and bool(org_id)
    return (
        [inflight_key(org_id), _pruned_key(org_id)],
        [request_id, time.time(), str(limit) if counted else "", GRACE_SECONDS, q.future_key(""), SET_TTL_SECONDS],
    )


def refused(count: int, limit: int | None) -> LimitExceeded:
    return LimitExceeded(
        f"the org has {count} training ops and samples in flight, the most this server allows "
        f"({REASON} = {limit}); wait for results before submitting more",
        RETRY_AFTER_S,
        reason=REASON,
    )


_ADMIT = admit_lua(1, 1) + "\nif adm_full then return adm_full end\nreturn -1\n"


async def admit_future(redis: aioredis.Redis, org_id: str, request_id: str, limit: int) -> None:
    """Count ``request_id`` as in flight for ``org_id``, or raise LimitExceeded when the org
    already has ``limit`` futures unanswered (a future not backed by an op: the enqueue
    scripts run :func:`admit_lua` themselves)."""
    keys, args = admission(org_id, request_id, limit)
    got = await redis.register_script(_ADMIT)(keys=keys, args=args)
    if int(got) >= 0:
        raise refused(int(got), limit)
