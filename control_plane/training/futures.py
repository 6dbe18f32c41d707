"""Long-polling futures: one Redis subscription per process wakes every waiting poll.

A future is the hash at ``future_key(request_id)`` (see :mod:`data_plane.wire.queue`); whoever
completes it PUBLISHes the request id on ``FUTURE_DONE_CHANNEL``. ``FutureWaiter`` keeps one
pub/sub connection per API process and hands each message to the polls waiting for that id,
so a completed op reaches its waiting poll within milliseconds and no poll sleeps in a loop.
Any replica can answer any poll: the hash is the source of truth, the message only a wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import redis.asyncio as aioredis
import structlog

from control_plane.training.queue import read_future
from data_plane.wire import queue as q

log = structlog.get_logger("openloops.futures")


class FutureWaiter:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            self._subscribed = asyncio.Event()
            self._task = asyncio.create_task(self._listen(), name="future-waiter")
        # a poll must not miss a message published between its read and its wait
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(q.FUTURE_DONE_CHANNEL)
                self._subscribed.set()
                # after a reconnect, wake everyone: a completion may have been missed
                self._wake_all()
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    rid = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
                    for ev in self._waiters.get(rid, ()):
                        ev.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis blip: resubscribe
                self._subscribed.clear()
                log.warning("future listener lost redis; resubscribing", error=str(exc))
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _wake_all(self) -> None:
        for evs in self._waiters.values():
            for ev in evs:
                ev.set()

    async def read(self, request_id: str, org_id: str | None = None) -> q.FutureResult | None:
        return await read_future(self._redis, request_id, org_id)

    async def wait(self, request_id: str, timeout_s: float, org_id: str | None = None) -> q.FutureResult | None:
        """The future's state once it is no longer pending, or still pending after
        ``timeout_s``; ``None`` when no such future exists for ``org_id`` (unknown, expired
        or another org's)."""
        await self._ensure_listening()
        ev = asyncio.Event()
        self._waiters[request_id].add(ev)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                ev.clear()  # before reading: a completion after the read still wakes us
                cur = await self.read(request_id, org_id)
                if cur is None or cur.state != q.FutureState.PENDING:
                    return cur
                left = deadline - loop.time()
                if left <= 0:
                    return cur
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), timeout=left)
        finally:
            evs = self._waiters.get(request_id)
            if evs is not None:
                evs.discard(ev)
                if not evs:
                    self._waiters.pop(request_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
