"""Serving logic of served models: an OpenAI client's request, authenticated by the API, goes
to the served model's own vLLM server and its answer comes back as it arrives.

- ``model`` is a checkpoint's name (or id), or the base model; it becomes the vLLM adapter
  name on the way in, and the answer names what the client asked for on the way out (the
  adapter names, object-store prefixes, never reach a client).
- Streaming answers (``stream: true``) are passed through chunk by chunk (SSE, ending
  ``data: [DONE]``), without parsing them.
- A scaled-to-zero served model is woken and waited for; one still starting is a 503.
- A serving served model is read from the database at most once a second per API
  process (a deactivation elsewhere is seen within that second) (and its activity recorded in Redis at most once a second), so a request costs no
  Postgres round trip in the steady state. Metering (:mod:`control_plane.metering.requests`)
  counts each request in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from control_plane.auth.principal import Principal
from control_plane.errors import Gone, InvalidInput, Unavailable
from control_plane.sampling.client import VLLMClient
from control_plane.scaling.activity import record_activity
from control_plane.scaling.kinds import SERVED_MODEL
from control_plane.scaling.wake import touch_and_wake
from control_plane.services import served_models as sm_svc
from control_plane.statuses import TERMINAL, Status

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

TARGET_CACHE_SECONDS = 1.0
ACTIVITY_EVERY_SECONDS = 1.0
RESOURCE = sm_svc.RESOURCE
SERVING = (Status.ACTIVE, Status.UNHEALTHY)


@dataclass(frozen=True, slots=True)
class Upstream:
    """A request ready to go: the served model, its server and the body vLLM gets."""

    served: sm_svc.Served
    client: VLLMClient
    body: bytes
    stream: bool
    rename: Callable[[bytes], bytes]  # the adapter's name in an answer -> the client's name
    n: int = 1  # the sequences asked for (what a stream's samples count as)


class ServedModelProxy:
    def __init__(self, runtime: Runtime) -> None:
        self.r = runtime
        self._targets: dict[str, tuple[float, sm_svc.Served]] = {}
        self._clients: dict[str, VLLMClient] = {}
        self._activity: dict[str, float] = {}
        self._reading: dict[tuple[str, str], asyncio.Task[sm_svc.Served]] = {}

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()

    # --- the served model, awake ---------------------------------------------------------
    async def _load(self, principal: Principal, served_model_id: str, *, fresh: bool = False) -> sm_svc.Served:
        hit = self._targets.get(served_model_id)
        now = time.monotonic()
        # only a serving one is cached: anything else is read again, so a change is seen at once
        if not fresh and hit is not None and now - hit[0] < TARGET_CACHE_SECONDS:
            cached = hit[1].model
            if cached.org_id == principal.org_id and Status(cached.status) in SERVING:
                return hit[1]
        if fresh:
            return await self._read(principal, served_model_id)
        # one read at a time per served model and org: the requests of a burst that find the
        # entry stale share it (each reading the same rows took a pooled connection, and
        # opened new ones past the pool, for every request in flight)
        key = (principal.org_id, served_model_id)
        task = self._reading.get(key)
        if task is None:
            task = self._reading[key] = asyncio.create_task(self._read(principal, served_model_id))
            task.add_done_callback(lambda t: self._reading.pop(key, None) if self._reading.get(key) is t else None)
        # shielded: a request that goes away does not cancel the read the others wait for
        return await asyncio.shield(task)

    async def _read(self, principal: Principal, served_model_id: str) -> sm_svc.Served:
        now = time.monotonic()
        async with self.r.db.session() as s:
            served = await sm_svc.get_served(s, principal, served_model_id)
        self._targets[served_model_id] = (now, served)
        return served

    def forget(self, served_model_id: str) -> None:
        self._targets.pop(served_model_id, None)

    async def _touch(self, served_model_id: str) -> None:
        now = time.monotonic()
        if now - self._activity.get(served_model_id, 0.0) >= ACTIVITY_EVERY_SECONDS:
            self._activity[served_model_id] = now
            await record_activity(self.r.redis, SERVED_MODEL, served_model_id)

    async def awake(self, principal: Principal, served_model_id: str) -> tuple[sm_svc.Served, VLLMClient]:
        """The served model and a client of its server: woken and waited for when it is
        scaled to zero (503 after ``wake_timeout_seconds``), 503 while it is starting, 410 once
        it is deactivated."""
        served = await self._load(principal, served_model_id)
        for attempt in range(2):
            status = Status(served.model.status)
            if status in TERMINAL or status == Status.DEACTIVATING:
                raise Gone(f"served model {served_model_id} is {status.value}")
            if status in SERVING and served.model.endpoint:
                await self._touch(served_model_id)
                return served, self._client(served.model.endpoint)
            if attempt == 0 and status in (Status.SCALED_TO_ZERO, Status.WAKING_UP):
                await touch_and_wake(self.r, "served_model", served_model_id)
                served = await self._load(principal, served_model_id, fresh=True)
                continue
            break
        raise Unavailable(f"served model {served_model_id} is {served.model.status}; retry when it is ACTIVE")

    def _client(self, endpoint: str) -> VLLMClient:
        c = self._clients.get(endpoint)
        if c is None:
            c = self._clients[endpoint] = VLLMClient(endpoint, max_in_flight=None)
        return c

    # --- requests ------------------------------------------------------------------------
    async def prepare(self, principal: Principal, served_model_id: str, raw: bytes) -> Upstream:
        """Check the body of a completion request and address it to the adapter it names."""
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise InvalidInput(f"the body is not JSON: {exc}", field="body") from exc
        if not isinstance(body, dict):
            raise InvalidInput("the body must be a JSON object", field="body")
        requested = body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise InvalidInput("model must be a string", field="model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidInput("stream must be true or false", field="stream")
        served, client = await self.awake(principal, served_model_id)
        adapter, label = served.adapter_for(requested)
        body["model"] = adapter
        old, new = msgspec.json.encode(adapter), msgspec.json.encode(label)

        def rename(chunk: bytes) -> bytes:
            return chunk.replace(old, new) if old != new else chunk

        n = body.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        return Upstream(served, client, msgspec.json.encode(body), stream, rename, n)


@dataclass(slots=True)
class Opened:
    """An upstream answer whose head has arrived: its status, content type, and its body as
    it arrives (renamed), which closes the upstream exchange when it ends or is closed."""

    status: int
    content_type: str
    body: AsyncGenerator[bytes, None]


async def open_upstream(up: Upstream, path: str) -> Opened:
    """POST the request; a streamed success comes back unread (passed on whole SSE events at a
    time, up to the last blank line received, so a name split across two reads is still
    renamed), anything else read whole."""
    resp = await up.client.post_unread(path, up.body)
    content_type = resp.headers.get("content-type", "application/json")
    if not up.stream or resp.status >= 300:
        try:
            data = up.rename(await resp.read())
        finally:
            resp.release()
        return Opened(resp.status, content_type, _once(data))

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            pending = b""
            async for chunk in resp.content.iter_any():
                pending += chunk
                cut = pending.rfind(b"\n\n")
                if cut >= 0:
                    yield up.rename(pending[: cut + 2])
                    pending = pending[cut + 2 :]
            if pending:
                yield up.rename(pending)
        finally:
            resp.release()

    return Opened(resp.status, content_type, events())


async def _once(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


def served_proxy_for(r: Runtime) -> ServedModelProxy:
    """The process's served-model proxy (one per runtime, created on first use; its HTTP pools
    are closed with the runtime)."""
    p = r.extras.get("served_model_proxy")
    if p is None:
        p = r.extras["served_model_proxy"] = ServedModelProxy(r)
    return p
