"""Turns a presented API key into a Principal.

Redis earns its place here: the key lookup is cached (shared by all replicas, so a revocation
that deletes the cache entry takes effect everywhere at once), the per-key token bucket lives
in the same Lua round trip, and last-used times are recorded in a Redis hash and flushed to
Postgres periodically instead of a write per request.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from sqlalchemy import select, update

from control_plane.auth.keys import hash_key, looks_like_key
from control_plane.auth.principal import Principal
from control_plane.db.engine import Database
from control_plane.last_seen import drain_hash
from control_plane.db.models import ApiKey
from control_plane.errors import RateLimited, Unauthenticated

CACHE_PREFIX = "openloops:apikey:"
BUCKET_PREFIX = "openloops:ratelimit:"
LAST_SEEN_KEYS = "openloops:lastseen:keys"

# KEYS: cache, bucket, lastseen; ARGV: now_s, rate, burst, key_hash, limit_enabled
_LUA = """
local p = redis.call('GET', KEYS[1])
if not p then return {0} end
local now = tonumber(ARGV[1])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
if ARGV[5] ~= '1' then return {1, p, 1, 0} end
local rate = tonumber(ARGV[2]); local burst = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[2], 't', 'ts')
local tokens = tonumber(b[1]); local ts = tonumber(b[2])
if tokens == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + (now - ts) * rate)
local allowed = 0; local wait_ms = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1
else wait_ms = math.ceil((1 - tokens) / rate * 1000) end
redis.call('HSET', KEYS[2], 't', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
return {1, p, allowed, wait_ms}
"""


@dataclass(frozen=True, slots=True)
class RateLimit:
    enabled: bool
    per_second: float
    burst: int


class Authenticator:
    def __init__(
        self, db: Database, redis: aioredis.Redis, rate_limit: RateLimit, cache_ttl_s: float
    ) -> None:
        self._db = db
        self._redis = redis
        self._rate = rate_limit
        self._ttl_ms = int(cache_ttl_s * 1000)
        self._script = redis.register_script(_LUA)

    async def authenticate(self, presented: str | None) -> Principal:
        if not presented:
            raise Unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>', "
                "'Authorization: Api-Key <key>' or 'X-API-Key: <key>'"
            )
        if not looks_like_key(presented):
            raise Unauthenticated("invalid API key")
        key_hash = hash_key(presented)
        result = await self._run(key_hash)
        if result[0] == 0:
            await self._load_into_cache(key_hash)
            result = await self._run(key_hash)
            if result[0] == 0:  # evicted in between: extremely unlikely, fail closed
                raise Unauthenticated("invalid API key")
        payload = json.loads(result[1])
        if payload is None:
            raise Unauthenticated("invalid or revoked API key")
        if not int(result[2]):
            retry = int(result[3]) / 1000
            raise RateLimited(
                f"rate limit of {self._rate.per_second:g} requests/s (burst {self._rate.burst}) "
                f"exceeded for this API key",
                retry_after_s=retry,
            )
        return Principal(
            org_id=payload["org_id"],
            principal_id=payload["principal_id"],
            key_id=payload["key_id"],
            scopes=frozenset(payload["scopes"]),
            key_hash=key_hash,
        )

    async def _run(self, key_hash: str) -> list:  # type: ignore[type-arg]
        return await self._script(
            keys=[CACHE_PREFIX + key_hash, BUCKET_PREFIX + key_hash, LAST_SEEN_KEYS],
            args=[
                f"{time.time():.6f}",
                self._rate.per_second,
                self._rate.burst,
                key_hash,
                "1" if self._rate.enabled else "0",
            ],
        )

    async def _load_into_cache(self, key_hash: str) -> None:
        async with self._db.session() as s:
            row = (await s.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))).scalar_one_or_none()
        if row is None or row.revoked_at is not None:
            payload = None  # negative entries are cached too, shorter
            ttl = min(self._ttl_ms, 5000)
        else:
            payload = {
                "org_id": row.org_id,
                "principal_id": row.user_id or row.service_account_id,
                "key_id": row.id,
                "scopes": list(row.scopes),
            }
            ttl = self._ttl_ms
        await self._redis.set(CACHE_PREFIX + key_hash, json.dumps(payload), px=ttl)


async def invalidate_key(redis: aioredis.Redis, key_hash: str) -> None:
    """Drop a key from the shared cache (called on revocation, by API and CLI alike)."""
    await redis.delete(CACHE_PREFIX + key_hash)


async def flush_last_seen(db: Database, redis: aioredis.Redis) -> int:
    """Move recorded last-used times from Redis into api_keys.last_used_at."""
    seen = await drain_hash(redis, LAST_SEEN_KEYS)
    if not seen:
        return 0
    async with db.transaction() as s:
        for raw_hash, raw_ts in seen.items():
            ts = datetime.fromtimestamp(float(raw_ts), tz=UTC)
            await s.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == raw_hash.decode())
                .values(last_used_at=ts)
            )
    return len(seen)
