"""The Loops sampler data plane at a sampler's ``base_url``
(``/v1/loops/samplers/{sampler_id}/sync``), as the Loops SDK speaks it, plus the status route
it polls and its wake route:

- ``POST /sample``: a vLLM completions body with token-id ``prompt``; the answer is vLLM's,
  with ``x-trainers-policy-version`` (see :mod:`control_plane.sampling.loops_plane` for which
  adapter serves: ``X-Checkpoint-Path``, ``X-Min-Policy-Version``, 408 below the floor);
- ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI-compatible
  (no streaming), ``model`` replaced by what serves (any value the client sends works);
- ``GET /trainers_policy_version``: the version of the adapter the sampler serves;
- ``POST /v1/loops/samplers/{id}/wake``: wake a scaled-to-zero sampler (202);
- ``GET /v1/models/{model_id}/deployments/{deployment_id}``: the sampler's status
  (``DeploymentStatusV1``), which the SDK polls until ACTIVE.

Authenticated like every route (another org's sampler is a 404); a request to a sampler that
was scaled to zero wakes it and waits.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.errors import error_response
from control_plane.api.loops.gateway_errors import DATA_PLANE_EXCEPTION_HANDLERS, mark
from control_plane.api.loops.training import ORG
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput
from control_plane.sampling.client import VLLMClient
from control_plane.sampling.errors import SamplerBusy, SamplerUnavailable
from control_plane.sampling.loops_plane import LoopsSamplerPlane, PolicyVersionBehind, Routing, Serving
from control_plane.scaling.wake import request_wake, touch_and_wake
from control_plane.services import samplers as samplers_svc
from control_plane.services.samplers import SamplerTarget

POLICY_VERSION_HEADER = "x-trainers-policy-version"
# body fields of /sample this server decides itself (the adapter) or cannot honour
_DROPPED = ("model", "lora")


def _behind(request: Request, exc: PolicyVersionBehind) -> Response[Any]:
    return mark(request, error_response(request, 408, "policy_version_behind", exc.message))


HANDLERS = {**DATA_PLANE_EXCEPTION_HANDLERS, PolicyVersionBehind: _behind}


async def _ready(
    request: Request, principal: Principal, sampler_id: str, plane: LoopsSamplerPlane, routing: Routing
) -> SamplerTarget:
    """The sampler, awake: a scaled-to-zero one is woken and waited for; one still starting
    answers 503 (the SDK retries)."""
    t = await plane.target(principal, sampler_id, routing)
    if await touch_and_wake(rt(request), "sampler", sampler_id) or not t.serving:
        plane.dispatcher.forget(principal.org_id, sampler_id)  # the cached status/endpoint may be stale
        t = await plane.target(principal, sampler_id, routing)
    if not t.serving:
        raise SamplerUnavailable(f"sampler {sampler_id} is {t.status.value}; retry when it is ACTIVE")
    return t


async def _forward(plane: LoopsSamplerPlane, serving: Serving, path: str, body: dict[str, Any]) -> Response[Any]:
    call_body = {**{k: v for k, v in body.items() if k not in _DROPPED}, "model": serving.model}

    async def call(client: VLLMClient, _t: SamplerTarget) -> tuple[int, Any]:
        return await client.forward_json(path, call_body)

    try:
        status, payload = await plane.dispatcher.run_direct(serving.target, call)  # type: ignore[misc]
    except SamplerBusy as exc:  # a dedicated sampler's client retries 503s, not 429s
        raise SamplerUnavailable(exc.message) from exc
    if isinstance(payload, dict) and "model" in payload:
        payload["model"] = body.get("model") or serving.label
    return Response(
        payload, status_code=status, media_type=MediaType.JSON, headers={POLICY_VERSION_HEADER: str(serving.version)}
    )


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    if data.get("stream"):
        raise InvalidInput("stream=true is not supported by this route; send stream=false", field="stream")
    return data


class LoopsSamplerPlaneController(Controller):
    path = "/v1/loops/samplers/{sampler_id:str}"
    dependencies = {"principal": Provide(provide_principal)}
    exception_handlers = HANDLERS  # type: ignore[assignment]
    tags = ["loops data plane"]

    @post("/sync/sample", opt=ORG, status_code=200)
    async def sample(self, request: Request, principal: Principal, sampler_id: str, data: Any) -> Response[Any]:
        body = _object(data)
        if body.get("model_input_chunks") is not None:
            raise InvalidInput("image prompts are not supported by this server (text only)", field="model_input_chunks")
        if body.get("include_routed_experts"):
            raise InvalidInput(
                "router replay (include_routed_experts) is not supported by this server", field="include_routed_experts"
            )
        prompt = body.get("prompt")
        if (
            not isinstance(prompt, list)
            or not prompt
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in prompt)
        ):
            raise InvalidInput("prompt must be a non-empty list of token ids", field="prompt")
        plane = LoopsSamplerPlane(rt(request))
        routing = Routing.of(request.headers)
        t = await _ready(request, principal, sampler_id, plane, routing)
        serving = await plane.serving(principal, t, routing)
        body = {k: v for k, v in body.items() if k != "include_routed_experts"}
        return await _forward(plane, serving, "/v1/completions", body)

    @get("/sync/v1/models", opt=ORG)
    async def models(self, request: Request, principal: Principal, sampler_id: str) -> dict[str, Any]:
        plane = LoopsSamplerPlane(rt(request))
        routing = Routing.of(request.headers) if _routed(request) else Routing(None, sampler_id, None, None)
        t = await plane.target(principal, sampler_id, routing)
        return plane.models_json(await plane.serving(principal, t, routing))

    @post("/sync/v1/completions", opt=ORG, status_code=200)
    async def completions(self, request: Request, principal: Principal, sampler_id: str, data: Any) -> Response[Any]:
        return await self._openai(request, principal, sampler_id, "/v1/completions", _object(data))

    @post("/sync/v1/chat/completions", opt=ORG, status_code=200)
    async def chat_completions(
        self, request: Request, principal: Principal, sampler_id: str, data: Any
    ) -> Response[Any]:
        return await self._openai(request, principal, sampler_id, "/v1/chat/completions", _object(data))

    async def _openai(
        self, request: Request, principal: Principal, sampler_id: str, path: str, body: dict[str, Any]
    ) -> Response[Any]:
        plane = LoopsSamplerPlane(rt(request))
        # plain OpenAI clients send no routing headers: the URL names the sampler
        routing = Routing.of(request.headers) if _routed(request) else Routing(None, sampler_id, None, None)
        t = await _ready(request, principal, sampler_id, plane, routing)
        return await _forward(plane, await plane.serving(principal, t, routing), path, body)

    @get("/sync/trainers_policy_version", opt=ORG)
    async def trainers_policy_version(self, request: Request, principal: Principal, sampler_id: str) -> dict[str, Any]:
        plane = LoopsSamplerPlane(rt(request))
        t = await plane.dispatcher.target(principal.org_id, sampler_id, max_age=0)
        return {"policy_version": t.version, "sampler_id": sampler_id}

    @post("/wake", opt=ORG, status_code=202)
    async def wake(self, request: Request, principal: Principal, sampler_id: str) -> dict[str, Any]:
        async with rt(request).db.session() as s:
            await samplers_svc.get_sampler(s, principal, sampler_id)  # 404 for another org's
        status = await request_wake(rt(request), "sampler", sampler_id)
        return {"sampler_id": sampler_id, "status": status.value}


def _routed(request: Request) -> bool:
    h = request.headers
    return any(h.get(k) for k in ("x-run-id", "x-sampler-id", "x-checkpoint-path", "x-min-policy-version"))


class SamplerStatusController(Controller):
    """The model-deployment status route the Loops SDK polls for a dedicated sampler
    (``sampler.model_id`` / ``sampler.deployment_id`` are both the sampler's id)."""

    path = "/v1/models"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops data plane"]

    @get("/{model_id:str}/deployments/{deployment_id:str}", opt=ORG)
    async def status(self, request: Request, principal: Principal, model_id: str, deployment_id: str) -> dict[str, Any]:
        async with rt(request).db.session() as s:
            smp = await samplers_svc.get_sampler(s, principal, model_id)
        if deployment_id != smp.id:
            from control_plane.errors import NotFound

            raise NotFound("deployment", f"{deployment_id} of model {model_id}")
        return {
            "id": smp.id,
            "model_id": smp.id,
            "name": smp.id,
            "status": smp.status,
            "status_reason": smp.status_reason,
            "created_at": smp.created_at,
            "is_production": True,
        }
