"""Runs sampling requests of one API process against the shared vLLM servers.

- :meth:`SamplingDispatcher.target` resolves a sampler row (org-scoped) to its vLLM model name
  and endpoint, cached briefly (rows pinned to a checkpoint or a base model change only by the
  controller; rows that follow a run's latest weights are resolved on every request).
- :meth:`SamplingDispatcher.submit` admits a Tinker ``asample`` (bounded in-flight per shared
  server: over the bound it raises :class:`SamplerBusy`, the API answers 429 and the SDK backs
  off), creates its pending future in Redis (in the server's pending group, so the controller
  fails it if the server dies) and runs it in a background task that waits for the server to be
  serving, samples, and completes the future with the ``SampleResponse`` protobuf bytes or a
  failure (``user`` / ``server`` category).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import structlog

from control_plane.db.engine import Database
from control_plane.errors import DomainError, Unavailable
from control_plane.ids import new_request_id
from control_plane.metering.requests import Outcome, sampling_resource
from control_plane.sampling.client import VLLMClient
from control_plane.sampling.errors import SamplerBusy, SamplerUnavailable, SamplingError
from control_plane.sampling.translate import SampleSpec
from control_plane.scaling.activity import record_activity
from control_plane.scaling.kinds import SAMPLER
from control_plane.scaling.wake import ASLEEP, request_wake, touch_and_wake
from control_plane.services.samplers import SamplerTarget, sampler_target
from control_plane.statuses import Status
from control_plane.training.queue import TrainerQueue
from data_plane.wire import queue as q

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

log = structlog.get_logger("openloops.sampling")
T = TypeVar("T")

TARGET_CACHE_SECONDS = 1.0
READY_POLL_SECONDS = 0.5
READY_TIMEOUT_SECONDS = 1800.0  # a cold GPU start pulls images and weights


@dataclass
class _Cached:
    target: SamplerTarget
    at: float


class SamplingDispatcher:
    def __init__(
        self,
        db: Database,
        queue: TrainerQueue,
        *,
        max_in_flight: int,
        runtime: Runtime | None = None,
    ) -> None:
        self._db = db
        self._runtime = runtime  # for scale to zero (activity, wake-ups); None in unit use
        self._queue = queue
        self.max_in_flight = max_in_flight
        self._clients: dict[str, VLLMClient] = {}
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[SamplerTarget]] = {}
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._touched: dict[str, float] = {}

    # ------------------------------------------------------------------ lookups

    async def target(self, org_id: str, sampler_id: str, *, max_age: float = TARGET_CACHE_SECONDS) -> SamplerTarget:
        key = (org_id, sampler_id)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit.at <= max_age and not hit.target.follows_run:
            return hit.target
        loading = self._loading.get(key)
        if loading is not None and not (hit is not None and hit.target.follows_run):
            # many requests arrive together when an entry expires: one query serves them all
            try:
                return await asyncio.shield(loading)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not loading.cancelled() or (task is not None and task.cancelling()):
                    raise
                return await self.target(org_id, sampler_id, max_age=max_age)  # the loader was cancelled
        fut: asyncio.Future[SamplerTarget] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            async with self._db.session() as s:
                t = await sampler_target(s, org_id, sampler_id)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            self._loading.pop(key, None)
        fut.set_result(t)
        self._cache[key] = _Cached(t, now)
        if len(self._cache) > 10_000:
            self._cache = {k: v for k, v in self._cache.items() if now - v.at <= max_age}
        return t

    def forget(self, org_id: str, sampler_id: str) -> None:
        self._cache.pop((org_id, sampler_id), None)

    def client(self, endpoint: str) -> VLLMClient:
        c = self._clients.get(endpoint)
        if c is None:
            # admission is bounded here (per server), not by the client
            c = self._clients[endpoint] = VLLMClient(endpoint, max_in_flight=None)
        return c

    async def wait_serving(
        self, org_id: str, sampler_id: str, timeout_s: float = READY_TIMEOUT_SECONDS
    ) -> SamplerTarget:
        """The target once its server serves; raises SamplerUnavailable when the sampler ended
        (failed, deactivated) or did not come up in time."""
        deadline = time.monotonic() + timeout_s
        t = await self.target(org_id, sampler_id)
        while not t.serving:
            if t.ended:
                raise SamplerUnavailable(
                    f"sampler {sampler_id} is {t.status.value}" + (f": {t.status_reason}" if t.status_reason else "")
                )
            if time.monotonic() > deadline:
                raise SamplerUnavailable(
                    f"sampler {sampler_id} was not ready after {timeout_s:.0f} s ({t.status.value})"
                )
            await asyncio.sleep(READY_POLL_SECONDS)
            t = await self.target(org_id, sampler_id, max_age=READY_POLL_SECONDS)
        return t

    # ------------------------------------------------------------------ sampling

    def in_flight(self, workload_id: str) -> int:
        return self._in_flight.get(workload_id, 0)

    async def submit(self, target: SamplerTarget, spec: SampleSpec) -> tuple[str, list[str]]:
        """Admit one asample; ``(request_id, sample_sequence_ids)``. Raises SamplerBusy."""
        wid = target.workload_id
        if self.in_flight(wid) >= self.max_in_flight:
            raise SamplerBusy(f"the sampler for {target.base_model} has {self.in_flight(wid)} requests in flight")
        if self._runtime is not None and target.status == Status.SCALED_TO_ZERO:
            # waking holds capacity again: refused (429 loops_capacity) before a future exists
            await request_wake(self._runtime, "sampler", target.sampler_id, strict=True)
        rid = new_request_id()
        limit = self._runtime.settings.max_inflight_futures_per_org if self._runtime is not None else None
        self._in_flight[wid] = self.in_flight(wid) + 1
        try:
            await self._queue.create_future(rid, run_id=wid, org_id=target.org_id, max_inflight=limit)
        except BaseException:
            self._in_flight[wid] -= 1
            raise
        self._spawn(wid, self._run(target, spec, rid))
        return rid, [f"{rid}:{i}" for i in range(spec.num_samples)]

    def _spawn(self, wid: str, coro: Awaitable[None]) -> None:
        async def wrapped() -> None:
            try:
                await coro
            finally:
                self._in_flight[wid] -= 1

        task = asyncio.get_running_loop().create_task(wrapped())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, target: SamplerTarget, spec: SampleSpec, rid: str) -> None:
        with self.metered(target) as out:
            try:
                result = await self._sample(target, spec, rid, out)
            except asyncio.CancelledError:
                out.skip = True  # server shutdown: not the sampler's doing
                raise
            out.status = 200 if result.state == q.FutureState.DONE else _failure_status(result.category)
        await self._queue.complete(target.workload_id, rid, result)

    async def _sample(self, target: SamplerTarget, spec: SampleSpec, rid: str, out: Outcome) -> q.FutureResult:
        try:
            await self._touch(target)
            if not target.serving:
                target = await self.wait_serving(target.org_id, target.sampler_id)
            assert target.endpoint is not None
            client = self.client(target.endpoint)
            payload, out.tokens = await client.sample_counted(spec, model=target.model, request_id=rid)
            return q.FutureResult.ok_proto(payload)
        except SamplingError as exc:
            if isinstance(exc, SamplerUnavailable):
                self.forget(target.org_id, target.sampler_id)
            return q.FutureResult.failed(exc.message, q.ErrorCategory(exc.category))
        except DomainError as exc:  # the pinned checkpoint was deleted meanwhile; a wake-up failed
            category = q.ErrorCategory.SERVER if isinstance(exc, Unavailable) else q.ErrorCategory.USER
            return q.FutureResult.failed(exc.message, category)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._queue.complete(
                        target.workload_id,
                        rid,
                        q.FutureResult.failed("sampling was cancelled (server shutdown)", q.ErrorCategory.SERVER),
                    )
                )
            raise
        except Exception as exc:  # never leave a future pending
            log.exception("sampling failed", request_id=rid, error=repr(exc))
            return q.FutureResult.failed(f"internal error while sampling: {exc!r}", q.ErrorCategory.SERVER)

    def metered(self, target: SamplerTarget) -> AbstractContextManager[Outcome]:
        """Counts one sampling request of ``target`` (latency, outcome, samples and tokens: set
        ``out.status`` and ``out.tokens``) for its run, or for the sampler when it has no run
        (a base model's); see :func:`control_plane.metering.requests.sampling_resource`."""
        if self._runtime is None:
            return contextlib.nullcontext(Outcome())
        return self._runtime.meter.track(*sampling_resource(target.metered_run_id, target.sampler_id))

    async def _touch(self, target: SamplerTarget) -> None:
        """Scale to zero: record the request; a sampler that was scaled to zero is woken and
        this waits until it is ACTIVE again (control_plane/scaling/wake.py)."""
        if self._runtime is None:
            return
        if target.status in ASLEEP:
            await touch_and_wake(self._runtime, "sampler", target.sampler_id)
            self.forget(target.org_id, target.sampler_id)
        else:
            now = time.monotonic()
            # at most one activity write per sampler per second and process: idleness is
            # measured in minutes, and every Redis round trip costs the sampler CPU
            if now - self._touched.get(target.sampler_id, 0.0) >= 1.0:
                self._touched[target.sampler_id] = now
                await record_activity(self._runtime.redis, SAMPLER, target.sampler_id)

    async def run_direct(self, target: SamplerTarget, call: Callable[[VLLMClient, SamplerTarget], Awaitable[T]]) -> T:
        """Run ``call`` against the target's server now (the OpenAI-compatible proxy), under
        the same in-flight bound."""
        wid = target.workload_id
        if not target.serving:
            raise SamplerUnavailable(f"sampler {target.sampler_id} is {target.status.value}; retry when it is ACTIVE")
        if self.in_flight(wid) >= self.max_in_flight:
            raise SamplerBusy(f"the sampler for {target.base_model} has {self.in_flight(wid)} requests in flight")
        self._in_flight[wid] = self.in_flight(wid) + 1
        try:
            assert target.endpoint is not None
            return await call(self.client(target.endpoint), target)
        finally:
            self._in_flight[wid] -= 1

    async def unload_deleted_adapter(self, base_model: str, storage_prefix: str) -> bool:
        """Best effort, after a checkpoint row and files were deleted: drop its adapter from the
        base model's running server (if any) so it stops holding a LoRA slot. Storage prefixes
        are unique per save, so nothing will ask for that name again; False if not loaded."""
        from sqlalchemy import select

        from control_plane.db.models import Sampler
        from data_plane.sampler.names import adapter_name_for_prefix

        async with self._db.session() as s:
            endpoint = (
                await s.execute(
                    select(Sampler.endpoint)
                    .where(Sampler.base_model == base_model, Sampler.endpoint.is_not(None))
                    .limit(1)
                )
            ).scalar_one_or_none()
        if endpoint is None:
            return False
        try:
            return await self.client(endpoint).unload_adapter(adapter_name_for_prefix(storage_prefix))
        except SamplingError as exc:
            log.info("could not unload a deleted checkpoint's adapter", error=exc.message)
            return False

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()


def dispatcher_for(r: Runtime) -> SamplingDispatcher:
    """The process's sampling dispatcher (one per runtime, created on first use)."""
    d = r.extras.get("sampling_dispatcher")
    if d is None:
        d = r.extras["sampling_dispatcher"] = SamplingDispatcher(
            r.db, TrainerQueue(r.redis), max_in_flight=r.settings.sampler_max_in_flight, runtime=r
        )
    return d


def _failure_status(category: q.ErrorCategory | None) -> int:
    """The HTTP class a failed sampling future is counted as (it answers no HTTP status)."""
    return 400 if category == q.ErrorCategory.USER else 503
