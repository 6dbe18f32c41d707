"""Long-polling futures: one Redis subscription per process wakes every waiting poll.

A future is the hash at ``future_key(request_id)`` (see :mod:`data_plane.wire.queue`); whoever
completes it PUBLISHes on ``FUTURE_DONE_CHANNEL`` (:func:`~data_plane.wire.queue.done_message`:
the request id, and the result itself when it is small). ``FutureWaiter`` keeps one pub/sub
connection per API process and hands each message to the polls waiting for that id, so a
completed op reaches its waiting poll within milliseconds and no poll sleeps in a loop. A poll
woken with the result in the message answers with it (the hash was written in the same
transaction, before the message); otherwise it reads the hash. Any replica can answer any poll:
the hash is the source of truth, the message a wake-up that may carry a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from control_plane.training.queue import read_future
from data_plane.wire import queue as q

log = structlog.get_logger("openloops.futures")


@dataclass(eq=False)
class _Poll:
    """One waiting poll: woken by its event, with the result when the message carried it."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    result: q.FutureResult | None = None


class FutureWaiter:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._waiters: dict[str, set[_Poll]] = defaultdict(set)
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
                    rid, result = q.parse_done_message(msg["data"])
                    for poll in self._waiters.get(rid, ()):
                        poll.result = result
                        poll.event.set()
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
        for polls in self._waiters.values():
            for poll in polls:
                poll.event.set()

    async def read(self, request_id: str, org_id: str | None = None) -> q.FutureResult | None:
        return await read_future(self._redis, request_id, org_id)

    async def wait(self, request_id: str, timeout_s: float, org_id: str | None = None) -> q.FutureResult | None:
        """The future's state once it is no longer pending, or still pending after
        ``timeout_s``; ``None`` when no such future exists for ``org_id`` (unknown, expired
        or another org's)."""
        await self._ensure_listening()
        poll = _Poll()
        self._waiters[request_id].add(poll)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                poll.event.clear()  # before reading: a completion after the read still wakes us
                # the first read is always the hash's: it says whether the future is the org's
                cur = await self.read(request_id, org_id)
                if cur is None or cur.state != q.FutureState.PENDING:
                    return cur
                left = deadline - loop.time()
                if left <= 0:
                    return cur
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poll.event.wait(), timeout=left)
                if poll.result is not None and poll.result.state != q.FutureState.PENDING:
                    return poll.result  # carried by the message: no read back
        finally:
            polls = self._waiters.get(request_id)
            if polls is not None:
                polls.discard(poll)
                if not polls:
                    self._waiters.pop(request_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
