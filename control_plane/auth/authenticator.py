"""Turns a presented API key into a Principal.

Two layers, so that a request usually costs no network round trip for its key:

- **Redis** (shared by all replicas) holds the key lookup cache (filled from Postgres; a
  revocation deletes the entry), the per-key token bucket, and the last-used times that the
  controller flushes to Postgres — one Lua round trip reads the key, takes tokens and records
  the use.
- **In process**, each replica keeps what that round trip returned for at most
  ``key_local_cache_seconds`` (< 1 s, which bounds how long a revoked key keeps working on a
  replica) together with a *lease* of tokens taken from the shared bucket: a lease is at most
  ``rate * LEASE_SECONDS`` tokens, so a replica never holds more than a tenth of a second's
  allowance, and a key below ten requests per second takes one token per round trip — exactly
  the shared bucket. Leased tokens unused when the entry expires are dropped, never returned
  twice. Last-used times are buffered and written to the Redis hash about once a second.

A wrong key costs what a right one does: an unknown or revoked key is cached (negatively, for
a few seconds) and takes tokens from its own bucket like any key, so repeating it is answered
429 once its bucket is empty. Trying many different wrong keys costs a database lookup each:
those lookups are budgeted per client address (``auth_lookups_per_minute``), past which the
address gets 429 without a lookup until the minute ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
import structlog
from sqlalchemy import select, update

from control_plane.auth.keys import hash_key, looks_like_key
from control_plane.auth.principal import Principal
from control_plane.db.engine import Database
from control_plane.db.last_seen import drain_hash
from control_plane.db.models import ApiKey
from control_plane.errors import RateLimited, Unauthenticated

log = structlog.get_logger("openloops.auth")

CACHE_PREFIX = "openloops:apikey:"
BUCKET_PREFIX = "openloops:ratelimit:"
LOOKUP_PREFIX = "openloops:authlookups:"  # + client address + minute: database lookups of unknown keys
LAST_SEEN_KEYS = "openloops:lastseen:keys"
LEASE_SECONDS = 0.1  # a lease is at most this much of a key's sustained rate
SEEN_FLUSH_SECONDS = 1.0  # buffered last-used times reach Redis this often
MAX_LOCAL_ENTRIES = 10_000

# KEYS: cache, bucket, lastseen; ARGV: now_s, rate, burst, key_hash, limit_enabled, want
# -> {0} unknown to the cache | {1, payload, granted_tokens, wait_ms}
_LUA = """
local p = redis.call('GET', KEYS[1])
if not p then return {0} end
local now = tonumber(ARGV[1])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
if ARGV[5] ~= '1' then return {1, p, 0, 0} end
local rate = tonumber(ARGV[2]); local burst = tonumber(ARGV[3]); local want = tonumber(ARGV[6])
local b = redis.call('HMGET', KEYS[2], 't', 'ts')
local tokens = tonumber(b[1]); local ts = tonumber(b[2])
if tokens == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local granted = math.min(want, math.floor(tokens)); local wait_ms = 0
if granted >= 1 then tokens = tokens - granted
else granted = 0; wait_ms = math.ceil((1 - tokens) / rate * 1000) end
redis.call('HSET', KEYS[2], 't', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
return {1, p, granted, wait_ms}
"""


@dataclass(frozen=True, slots=True)
class RateLimit:
    enabled: bool
    per_second: float
    burst: int

    @property
    def lease(self) -> int:
        """Tokens taken from the shared bucket per round trip."""
        return max(1, min(self.burst, int(self.per_second * LEASE_SECONDS)))


@dataclass(slots=True)
class _Entry:
    principal: Principal | None  # None: unknown or revoked key
    expires: float  # time.monotonic() after which the entry is read again
    tokens: int = 0  # leased tokens left
    denied_until: float = 0.0  # the shared bucket was empty: 429 locally until then


class Authenticator:
    def __init__(
        self,
        db: Database,
        redis: aioredis.Redis,
        rate_limit: RateLimit,
        cache_ttl_s: float,
        *,
        local_ttl_s: float = 0.5,
        lookups_per_minute: int = 0,
    ) -> None:
        self._db = db
        self._redis = redis
        self._rate = rate_limit
        self._ttl_ms = int(cache_ttl_s * 1000)
        self._local_ttl = local_ttl_s
        self._lookups_per_minute = lookups_per_minute  # per client address; 0 = unlimited
        self.lookups = 0  # database lookups of keys made by this process (for tests and metrics)
        self._script = redis.register_script(_LUA)
        self._entries: dict[str, _Entry] = {}
        self._refreshing: dict[str, asyncio.Future[_Entry]] = {}
        self._seen: dict[str, float] = {}
        self._seen_flushed_at = time.monotonic()
        self._flush_task: asyncio.Task[None] | None = None

    async def authenticate(self, presented: str | None, client: str | None = None) -> Principal:
        """The principal of ``presented``; ``client`` is the caller's address (its database
        lookups of unknown keys are budgeted)."""
        if not presented:
            raise Unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>', "
                "'Authorization: Api-Key <key>' or 'X-API-Key: <key>'"
            )
        if not looks_like_key(presented):
            raise Unauthenticated("invalid API key")
        key_hash = hash_key(presented)
        limited = self._rate.enabled
        while True:
            now = time.monotonic()
            e = self._entries.get(key_hash)
            if e is None or now >= e.expires or (limited and e.tokens <= 0 and now >= e.denied_until):
                e = await self._refresh(key_hash, client)
                now = time.monotonic()
            if not limited:
                if e.principal is None:
                    raise Unauthenticated("invalid or revoked API key")
                break
            if e.tokens > 0:
                e.tokens -= 1
                break
            if now < e.denied_until:
                raise self._limited(e.denied_until - now)
            # the lease went to concurrent requests of this key: take another (each round
            # trip either grants a token to someone or answers 429, so this ends)
        if e.principal is None:  # it took its token like a right key: repeating it ends in 429
            raise Unauthenticated("invalid or revoked API key")
        self._record_seen(key_hash, now)
        return e.principal

    def _limited(self, wait_s: float) -> RateLimited:
        return RateLimited(
            f"rate limit of {self._rate.per_second:g} requests/s (burst {self._rate.burst}) exceeded for this API key",
            retry_after_s=max(wait_s, 0.001),
        )

    # ------------------------------------------------------------------ shared state

    async def _refresh(self, key_hash: str, client: str | None = None) -> _Entry:
        """One round trip for the key (single flight: concurrent requests share it)."""
        pending = self._refreshing.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._refreshing[key_hash] = fut
        try:
            entry = await self._fetch(key_hash, client)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            self._refreshing.pop(key_hash, None)
        fut.set_result(entry)
        return entry

    async def _fetch(self, key_hash: str, client: str | None = None) -> _Entry:
        result = await self._run(key_hash)
        if result[0] == 0:
            await self._budget_lookup(client)
            await self._load_into_cache(key_hash)
            result = await self._run(key_hash)
            if result[0] == 0:  # evicted in between: extremely unlikely, fail closed
                raise Unauthenticated("invalid API key")
        now = time.monotonic()
        payload = json.loads(result[1])
        principal = None
        if payload is not None:
            principal = Principal(
                org_id=payload["org_id"],
                principal_id=payload["principal_id"],
                key_id=payload["key_id"],
                scopes=frozenset(payload["scopes"]),
                key_hash=key_hash,
            )
        granted, wait_s = int(result[2]), int(result[3]) / 1000
        old = self._entries.get(key_hash)
        tokens = granted + (old.tokens if old is not None and now < old.expires and old.tokens > 0 else 0)
        entry = _Entry(principal, now + self._local_ttl, tokens, denied_until=now + wait_s if granted == 0 else 0.0)
        if len(self._entries) >= MAX_LOCAL_ENTRIES:
            self._entries = {k: v for k, v in self._entries.items() if now < v.expires}
        if self._local_ttl > 0:
            self._entries[key_hash] = entry
        return entry

    async def _run(self, key_hash: str) -> list:
        return await self._script(
            keys=[CACHE_PREFIX + key_hash, BUCKET_PREFIX + key_hash, LAST_SEEN_KEYS],
            args=[
                f"{time.time():.6f}",
                self._rate.per_second,
                self._rate.burst,
                key_hash,
                "1" if self._rate.enabled else "0",
                self._rate.lease,
            ],
        )

    async def _budget_lookup(self, client: str | None) -> None:
        """Count a database lookup against the client's budget for this minute; 429 past it."""
        if not self._lookups_per_minute or not client:
            return
        minute = int(time.time() // 60)
        key = f"{LOOKUP_PREFIX}{client}:{minute}"
        p = self._redis.pipeline(transaction=True)
        p.incr(key)
        p.expire(key, 120)
        count = int((await p.execute())[0])
        if count > self._lookups_per_minute:
            raise RateLimited(
                f"too many unknown API keys from this address ({self._lookups_per_minute} lookups a minute); "
                "check the key you send",
                retry_after_s=max(0.001, 60 - time.time() % 60),
            )

    async def _load_into_cache(self, key_hash: str) -> None:
        self.lookups += 1
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

    # ------------------------------------------------------------------ last used

    def _record_seen(self, key_hash: str, now: float) -> None:
        self._seen[key_hash] = time.time()
        if now - self._seen_flushed_at >= SEEN_FLUSH_SECONDS and (self._flush_task is None or self._flush_task.done()):
            self._seen_flushed_at = now
            self._flush_task = asyncio.create_task(self.flush_seen())

    async def flush_seen(self) -> None:
        """Write the buffered last-used times to the shared hash (a newer time wins there
        too: it is the later write)."""
        seen, self._seen = self._seen, {}
        if not seen:
            return
        try:
            await self._redis.hset(LAST_SEEN_KEYS, mapping={k: f"{v:.6f}" for k, v in seen.items()})
        except Exception as exc:  # noqa: BLE001 - last-used is best effort; never fail a request
            log.warning("could not record API key last-used times", error=str(exc), keys=len(seen))

    def forget(self, key_hash: str) -> None:
        """Drop this process's entry of a key (a revocation made here takes effect here at once;
        other replicas follow within ``key_local_cache_seconds``)."""
        self._entries.pop(key_hash, None)

    async def close(self) -> None:
        if self._flush_task is not None:
            with contextlib.suppress(Exception):
                await self._flush_task
        await self.flush_seen()


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
            await s.execute(update(ApiKey).where(ApiKey.key_hash == raw_hash.decode()).values(last_used_at=ts))
    return len(seen)
