"""Last-seen times recorded in Redis hashes (no Postgres write per request) and drained in
batches by the controller."""

from __future__ import annotations

import redis.asyncio as aioredis


async def drain_hash(redis: aioredis.Redis, key: str) -> dict[bytes, bytes]:
    """Atomically read and delete a hash of ``member -> epoch seconds``."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(key)
        pipe.delete(key)
        seen, _ = await pipe.execute()
    return seen
