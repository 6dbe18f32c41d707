"""What every consumer of a Redis stream through a consumer group shares (the completions and
the telemetry consumers): creating the group once, and polling until stopped, surviving Redis
or PostgreSQL blips."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import structlog

RETRY_SECONDS = 1.0


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) unless it exists."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except aioredis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def poll_forever(
    ensure: Callable[[], Awaitable[None]],
    poll_once: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    log: structlog.typing.FilteringBoundLogger,
    what: str,
) -> None:
    """``ensure()`` then ``poll_once()`` until ``stop`` is set; any error but cancellation is
    logged and retried after :data:`RETRY_SECONDS`, never fatal."""
    while not stop.is_set():
        try:
            await ensure()
            while not stop.is_set():
                await poll_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis or Postgres blip: retry, never die
            log.warning(f"{what} error; retrying", error=str(exc))
            await asyncio.sleep(RETRY_SECONDS)
