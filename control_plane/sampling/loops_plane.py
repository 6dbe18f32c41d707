"""The Loops sampler data plane: which adapter a request gets, and sampling with it.

A sampler serves its run's published adapter (a paired sampler), its pinned checkpoint, or
the base model (:func:`control_plane.services.samplers.sampler_target`). A request may narrow
that with two headers the Loops SDK sends:

- ``X-Checkpoint-Path`` pins a checkpoint of the caller's org (``bt://loops:`` or ``tinker://``
  path, same base model);
- ``X-Min-Policy-Version`` is a floor for the live adapter's version: when the run has
  published at least that version, the live adapter serves; otherwise the pinned checkpoint
  if there is one, else the request waits briefly for the publish and then answers 408 (the
  SDK retries it).

The answer's ``x-trainers-policy-version`` header is the version of the adapter that served.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput, NotFound, RunOrSamplerRequired
from control_plane.sampling.dispatcher import SamplingDispatcher, dispatcher_for
from control_plane.services import runs as runs_svc
from control_plane.services.samplers import SamplerTarget

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

FLOOR_WAIT_SECONDS = 5.0
FLOOR_POLL_SECONDS = 0.2


class PolicyVersionBehind(Exception):
    """The live adapter is below the request's ``X-Min-Policy-Version`` (answered 408)."""

    def __init__(self, floor: int, live: int) -> None:
        super().__init__(f"the sampler serves policy version {live}; the request needs at least {floor}")
        self.message = str(self)


@dataclass(frozen=True, slots=True)
class Routing:
    """The routing headers of one request."""

    run_id: str | None
    sampler_id: str | None
    checkpoint_path: str | None
    min_policy_version: int | None

    @classmethod
    def of(cls, headers: Any) -> Routing:
        floor_raw = headers.get("x-min-policy-version")
        floor = None
        if floor_raw is not None:
            try:
                floor = int(floor_raw)
            except ValueError:
                raise InvalidInput("X-Min-Policy-Version must be an integer", field="X-Min-Policy-Version") from None
            if floor < 0:
                raise InvalidInput("X-Min-Policy-Version must be >= 0", field="X-Min-Policy-Version")
        r = cls(headers.get("x-run-id"), headers.get("x-sampler-id"), headers.get("x-checkpoint-path"), floor or None)
        if r.run_id and r.sampler_id:
            raise RunOrSamplerRequired("name exactly one of X-Run-Id or X-Sampler-Id, not both", field="X-Run-Id")
        if not (r.run_id or r.sampler_id or r.checkpoint_path):
            raise RunOrSamplerRequired(
                "name the run (X-Run-Id), the sampler (X-Sampler-Id) or the checkpoint (X-Checkpoint-Path) "
                "this request is for",
                field="X-Run-Id",
            )
        return r


@dataclass(frozen=True, slots=True)
class Serving:
    target: SamplerTarget  # the sampler row (status, endpoint) as resolved now
    model: str  # the name vLLM serves it under
    version: int
    label: str  # what /v1/models calls it


class LoopsSamplerPlane:
    def __init__(self, runtime: Runtime) -> None:
        self.r = runtime
        self.dispatcher: SamplingDispatcher = dispatcher_for(runtime)

    async def target(self, principal: Principal, sampler_id: str, routing: Routing) -> SamplerTarget:
        t = await self.dispatcher.target(principal.org_id, sampler_id)  # 404 for another org's
        if routing.sampler_id and routing.sampler_id != sampler_id:
            raise NotFound("sampler", routing.sampler_id)
        if routing.run_id and routing.run_id != t.run_id:
            raise NotFound("run", f"{routing.run_id} on sampler {sampler_id}")
        return t

    async def serving(
        self, principal: Principal, t: SamplerTarget, routing: Routing, *, wait_s: float = FLOOR_WAIT_SECONDS
    ) -> Serving:
        pinned = await self._pinned(principal, t, routing.checkpoint_path) if routing.checkpoint_path else None
        floor = routing.min_policy_version
        if floor is None:
            return pinned or self._live(t)
        deadline = time.monotonic() + wait_s
        while True:
            if t.follows_run and t.version >= floor:
                return self._live(t)
            if pinned is not None:
                return pinned
            if time.monotonic() >= deadline or not t.follows_run:
                raise PolicyVersionBehind(floor, t.version)
            await asyncio.sleep(FLOOR_POLL_SECONDS)
            t = await self.dispatcher.target(principal.org_id, t.sampler_id, max_age=0)

    @staticmethod
    def _live(t: SamplerTarget) -> Serving:
        return Serving(t, t.model, t.version, t.adapter_label or t.base_model)

    async def _pinned(self, principal: Principal, t: SamplerTarget, path: str) -> Serving:
        from data_plane.sampler.names import adapter_name_for_prefix

        async with self.r.db.session() as s:
            ckpt = await runs_svc.resolve_weights_checkpoint(
                s, principal, path, field="X-Checkpoint-Path", kind=("sampler_weights", "weights")
            )
        if ckpt.base_model != t.base_model:
            raise InvalidInput(
                f"checkpoint {path!r} was trained on {ckpt.base_model}; sampler {t.sampler_id} serves {t.base_model}",
                field="X-Checkpoint-Path",
            )
        return Serving(t, adapter_name_for_prefix(ckpt.storage_prefix), ckpt.policy_version or 0, ckpt.name)

    def models_json(self, serving: Serving) -> dict[str, Any]:
        """``GET /v1/models``: the base model (``parent`` null) and the adapter that serves."""
        base = serving.target.base_model
        data: list[dict[str, Any]] = [
            {"id": base, "object": "model", "owned_by": "openloops", "root": base, "parent": None}
        ]
        if serving.model != base:
            data.append({"id": serving.label, "object": "model", "owned_by": "openloops", "root": base, "parent": base})
        return {"object": "list", "data": data}
