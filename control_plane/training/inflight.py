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


# KEYS: the org's set, its prune marker; ARGV: request id, now, limit, grace, future key prefix, ttl
_ADMIT = """
local limit = tonumber(ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then
  if redis.call('SET', KEYS[2], '1', 'NX', 'PX', 1000) then
    local now = tonumber(ARGV[2])
    local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
    for i = 1, #members, 2 do
      local state = redis.call('HGET', ARGV[5] .. members[i], 'state')
      if (state and state ~= 'pending') or ((not state) and tonumber(members[i + 1]) < now - tonumber(ARGV[4])) then
        redis.call('ZREM', KEYS[1], members[i])
      end
    end
    n = redis.call('ZCARD', KEYS[1])
  end
  if n >= limit then return n end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return -1
"""


async def admit_future(redis: aioredis.Redis, org_id: str, request_id: str, limit: int) -> None:
    """Count ``request_id`` as in flight for ``org_id``, or raise LimitExceeded when the org
    already has ``limit`` futures unanswered."""
    got = await redis.register_script(_ADMIT)(
        keys=[inflight_key(org_id), _pruned_key(org_id)],
        args=[request_id, time.time(), limit, GRACE_SECONDS, q.future_key(""), SET_TTL_SECONDS],
    )
    if int(got) >= 0:
        raise LimitExceeded(
            f"the org has {int(got)} training ops and samples in flight, the most this server allows "
            f"({REASON} = {limit}); wait for results before submitting more",
            RETRY_AFTER_S,
            reason=REASON,
        )
