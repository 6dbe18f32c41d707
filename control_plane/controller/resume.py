"""Whether a deployment whose trainer died is brought back, and how many times in a row.

Runs are durable (docs/durability.md): a new trainer worker restores the run's snapshot and
replays its op log, so a dead trainer (killed, OOM, evicted, preempted, its node lost) is
restarted, not failed. What stops the loop is a trainer that keeps dying without getting
anywhere: the attempts are counted in Redis per deployment (they survive a controller
restart or failover) together with the run's ``next_seq`` at the last death. A death after
the run executed a new op starts the count over; ``run_resume_max_attempts`` deaths at the
same op fail the deployment (and with it the run) with the reason of the last one.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from data_plane.wire import queue as q


def resume_key(deployment_id: str) -> str:
    return f"{q.PREFIX}:resume:{deployment_id}"


@dataclass(frozen=True, slots=True)
class ResumeDecision:
    resume: bool
    attempt: int
    at_seq: int
    reason: str  # for the status history row


async def decide(
    redis: aioredis.Redis,
    deployment_id: str,
    run_id: str | None,
    died: str,
    max_attempts: int,
) -> ResumeDecision:
    """Record one death of ``deployment_id``'s trainer (``died`` says how) and decide."""
    at_seq = 0
    if run_id is not None:
        raw = await redis.hget(q.run_state_key(run_id), "next_seq")
        at_seq = int(raw or 0)
    key = resume_key(deployment_id)
    prev = q.fields_of(await redis.hgetall(key))
    prev_seq = int(prev.get(b"at_seq", b"-1"))
    attempt = int(prev.get(b"attempts", b"0")) + 1 if prev_seq == at_seq else 1
    await redis.hset(key, mapping={"attempts": attempt, "at_seq": at_seq, "last": died[:2000]})
    what = f"run {run_id}" if run_id else "the deployment"
    if attempt > max_attempts:
        return ResumeDecision(
            False,
            attempt,
            at_seq,
            f"the trainer died {attempt} times in a row at seq {at_seq} without getting further, so {what} "
            f"is not resumed again; last: {died}",
        )
    return ResumeDecision(
        True,
        attempt,
        at_seq,
        f"{died}; restarting the trainer to resume {what} from its snapshot and op log "
        f"(attempt {attempt} of {max_attempts})",
    )


async def forget(redis: aioredis.Redis, deployment_id: str) -> None:
    await redis.delete(resume_key(deployment_id))
