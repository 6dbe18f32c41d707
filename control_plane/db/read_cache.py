"""A short-lived, per-process cache for the reads a training loop polls (a run, a run's
checkpoints), kept coherent with every writer.

- Entries are grouped by run id and live at most ``ttl_s`` (``read_cache_seconds``, < 5 s):
  whatever else happens, no process answers from data older than that.
- Every process LISTENs on ``openloops_reads``. Triggers on runs, samplers, checkpoints, users
  and service accounts (migration 0004) NOTIFY the affected run id at commit — whoever wrote:
  another API replica, the controller, the admin CLI, plain SQL — and the run's entries are
  dropped when the notification arrives (typically within a millisecond).
- A write committed through this process's :class:`~control_plane.db.engine.Database`
  transactions drops the whole cache at once, before the response leaves: a client always
  reads its own writes from the replica it wrote through.
- A read that started before an invalidation never stores its (possibly older) result: each
  run has a generation that invalidations bump, checked before storing.
- While the listener is not connected (start-up, reconnecting) the cache is bypassed and
  emptied: nothing is served that a missed notification could have invalidated.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, TypeVar

import asyncpg
import structlog

log = structlog.get_logger("openloops.read_cache")

CHANNEL = "openloops_reads"
ALL = "*"  # payload: drop every entry
RECONNECT_SECONDS = 1.0
PROBE_SECONDS = 5.0  # the listener connection answers a query this often, or is replaced

T = TypeVar("T")


class ReadCache:
    def __init__(self, connect_kwargs: Mapping[str, Any], *, ttl_s: float, max_runs: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self._connect_kwargs = dict(connect_kwargs)
        self._max_runs = max_runs
        self._entries: dict[str, dict[Hashable, tuple[float, Any]]] = {}
        self._gens: dict[str, int] = {}
        self._epoch = 0
        self._loading: dict[tuple[str, Hashable, tuple[int, int]], asyncio.Future[Any]] = {}
        self._listening = False
        self.listener_pid: int | None = None  # the LISTEN connection's server process (ops, tests)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and not self._closed

    @property
    def listening(self) -> bool:
        return self._listening

    # ------------------------------------------------------------------ reads

    async def get_or_load(self, run_id: str, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """The cached value of ``key`` (one of ``run_id``'s reads), else ``load()``'s result,
        stored for later. Exceptions (a 404) are never cached."""
        if not self.enabled:
            return await load()
        self._ensure_listener()
        if not self._listening:
            return await load()
        now = time.monotonic()
        bucket = self._entries.get(run_id)
        if bucket is not None:
            hit = bucket.get(key)
            if hit is not None and hit[0] > now:
                self.hits += 1
                return hit[1]
        self.misses += 1
        token = (self._epoch, self._gens.get(run_id, 0))
        # single flight: requests that miss together (an entry just expired under load) share
        # one query; one that arrives after an invalidation (new token) starts its own
        flight = (run_id, key, token)
        pending = self._loading.get(flight)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._loading[flight] = fut
        try:
            value = await load()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: the waiters re-raise it
            raise
        finally:
            self._loading.pop(flight, None)
        fut.set_result(value)
        if self._listening and token == (self._epoch, self._gens.get(run_id, 0)):
            bucket = self._entries.get(run_id)
            if bucket is None:
                if len(self._entries) >= self._max_runs:
                    self._prune(now)
                bucket = self._entries.setdefault(run_id, {})
            bucket[key] = (now + self.ttl_s, value)
        return value

    # ------------------------------------------------------------------ invalidation

    def invalidate(self, run_id: str) -> None:
        self._entries.pop(run_id, None)
        self._gens[run_id] = self._gens.get(run_id, 0) + 1
        if len(self._gens) > 4 * self._max_runs:
            self.clear()  # forgetting generations is only safe together with a new epoch

    def clear(self) -> None:
        """Drop everything; reads in flight will not store what they read."""
        self._epoch += 1
        self._entries.clear()
        self._gens.clear()

    def _prune(self, now: float) -> None:
        for rid in [rid for rid, b in self._entries.items() if all(exp <= now for exp, _ in b.values())]:
            del self._entries[rid]
        if len(self._entries) >= self._max_runs:
            self._entries.clear()  # all fresh: start over (bounded memory beats a hit rate)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == ALL:
            self.clear()
        else:
            self.invalidate(str(payload))

    # ------------------------------------------------------------------ listener

    def _ensure_listener(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen_forever(), name="read-cache-listener")

    async def _listen_forever(self) -> None:
        while not self._closed:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()

            def on_lost(
                _conn: object, lost: asyncio.Event = lost
            ) -> None:  # the server closed it: stop serving at once
                self._listening = False
                self.clear()
                lost.set()

            try:
                conn = await asyncpg.connect(**self._connect_kwargs)
                conn.add_termination_listener(on_lost)
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listener_pid = conn.get_server_pid()
                self.clear()  # notifications sent while we were not listening are lost
                self._listening = True
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=PROBE_SECONDS)
                    except TimeoutError:  # quiet: make sure the connection still answers
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=PROBE_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database down or connection lost: bypass, retry
                log.warning("read cache listener failed; serving uncached until it reconnects", error=str(exc))
            finally:
                self._listening = False
                self.listener_pid = None
                self.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            if lost.is_set():
                log.warning("read cache listener connection closed; serving uncached until it reconnects")
            if not self._closed:
                await asyncio.sleep(RECONNECT_SECONDS)

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.clear()
