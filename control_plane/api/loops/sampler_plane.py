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

from typing import Annotated, Any

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import Provide
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import KwargDefinition, Parameter

from control_plane.api.auth import provide_principal
from control_plane.api.errors import error_response, http_status_of
from control_plane.api.fields import items, path_id
from control_plane.api.loops.gateway_errors import DATA_PLANE_EXCEPTION_HANDLERS, mark
from control_plane.api.loops.responses import (
    ModelList,
    SamplerDeploymentStatus,
    SamplerPolicyVersion,
    WakeAccepted,
)
from control_plane.api.loops.training import ORG, SamplerPath
from control_plane.api.openapi import ErrorKind, raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import Gone, InvalidInput, NotFound, PayloadTooLarge, RunOrSamplerRequired, Unavailable
from control_plane.fields import CHECKPOINT_PATH, INT64_MAX, NO_NUL, Text, column_length
from control_plane.metering.requests import Tokens
from control_plane.sampling.client import VLLMClient
from control_plane.sampling.errors import SamplerBusy, SamplerFailed, SamplerUnavailable
from control_plane.sampling.loops_plane import LoopsSamplerPlane, PolicyVersionBehind, Routing, Serving
from control_plane.scaling.wake import request_wake, touch_and_wake
from control_plane.services import samplers as samplers_svc
from control_plane.services.samplers import SamplerTarget

POLICY_VERSION_HEADER = "x-trainers-policy-version"
# body fields of /sample this server decides itself (the adapter) or cannot honour
_DROPPED = ("model", "lora")

TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
RunHeader = Annotated[
    str | None,
    Parameter(
        header="X-Run-Id", max_length=column_length(m.Run.id), pattern=NO_NUL, description="the run it samples for"
    ),
]
SamplerHeader = Annotated[
    str | None,
    Parameter(
        header="X-Sampler-Id", max_length=column_length(m.Sampler.id), pattern=NO_NUL, description="this sampler"
    ),
]
CheckpointHeader = Annotated[
    str | None,
    Parameter(header="X-Checkpoint-Path", pattern=CHECKPOINT_PATH, description="pin a checkpoint of the caller's org"),
]
MinVersionHeader = Annotated[
    int | None,
    Parameter(header="X-Min-Policy-Version", ge=0, le=INT64_MAX, description="the oldest adapter version to serve"),
]


class CompletionsBody(msgspec.Struct, kw_only=True):
    """An OpenAI-compatible completions/chat body; every field is passed to vLLM as sent
    (``model`` is replaced by what serves)."""

    model: Text | None = None
    stream: Annotated[bool, KwargDefinition(description="must be false: streaming is not supported")] = False


class SampleBody(CompletionsBody, kw_only=True):
    """A vLLM completions body whose prompt is token ids (the Loops SDK's ``sample``)."""

    prompt: Annotated[list[TokenId], items(OpenAPIType.INTEGER, minimum=0, maximum=2**31 - 1, min_items=1)]
    include_routed_experts: Annotated[bool, KwargDefinition(description="router replay: not supported")] = False
    model_input_chunks: Annotated[Any, KwargDefinition(description="image prompts: not supported")] = None


# what vLLM answers, passed through (its own error bodies too)
VLLMAnswer = dict[str, Any]
# what sampling on a sampler can answer besides the routing errors
_SAMPLING_ERRORS: tuple[ErrorKind, ...] = (
    InvalidInput,
    RunOrSamplerRequired,
    PayloadTooLarge,
    NotFound,
    Gone,
    Unavailable,
    SamplerUnavailable,
    SamplerFailed,
    (408, "policy_version_behind"),
)


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

    with plane.dispatcher.metered(serving.target) as out:
        try:
            status, payload = await plane.dispatcher.run_direct(serving.target, call)
        except SamplerBusy as exc:  # a dedicated sampler's client retries 503s, not 429s
            out.status = 503
            raise SamplerUnavailable(exc.message) from exc
        except BaseException as exc:
            out.status = http_status_of(exc)
            raise
        out.status = status
        out.tokens = Tokens.of_completion(payload) if status < 400 else None
    if isinstance(payload, dict) and "model" in payload:
        payload["model"] = body.get("model") or serving.label
    return Response(
        payload, status_code=status, media_type=MediaType.JSON, headers={POLICY_VERSION_HEADER: str(serving.version)}
    )


async def _raw_object(request: Request) -> dict[str, Any]:
    """The body as sent (its typed form checked it): vLLM gets every field."""
    data = await request.json()
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object", field="body")
    if data.get("stream"):
        raise InvalidInput("stream=true is not supported by this route; send stream=false", field="stream")
    return data


def _routing(request: Request, sampler_id: str) -> Routing:
    # plain OpenAI clients send no routing headers: the URL names the sampler
    return Routing.of(request.headers) if _routed(request) else Routing(None, sampler_id, None, None)


class LoopsSamplerPlaneController(Controller):
    path = "/v1/loops/samplers/{sampler_id:str}"
    dependencies = {"principal": Provide(provide_principal)}
    exception_handlers = HANDLERS  # type: ignore[assignment]
    tags = ["loops data plane"]

    @post("/sync/sample", opt=ORG, status_code=200, responses=raises(*_SAMPLING_ERRORS, ok=VLLMAnswer))
    async def sample(
        self,
        request: Request,
        principal: Principal,
        sampler_id: SamplerPath,
        data: SampleBody,
        x_run_id: RunHeader = None,
        x_sampler_id: SamplerHeader = None,
        x_checkpoint_path: CheckpointHeader = None,
        x_min_policy_version: MinVersionHeader = None,
    ) -> Response[Any]:
        """vLLM's completions answer, with ``x-trainers-policy-version``. Name the run, the
        sampler or a checkpoint in the routing headers."""
        if data.model_input_chunks is not None:
            raise InvalidInput("image prompts are not supported by this server (text only)", field="model_input_chunks")
        if not data.prompt:
            raise InvalidInput("prompt must be a non-empty list of token ids", field="prompt")
        if data.include_routed_experts:
            raise InvalidInput(
                "router replay (include_routed_experts) is not supported by this server", field="include_routed_experts"
            )
        body = await _raw_object(request)
        plane = LoopsSamplerPlane(rt(request))
        routing = Routing.of(request.headers)
        t = await _ready(request, principal, sampler_id, plane, routing)
        serving = await plane.serving(principal, t, routing)
        body = {k: v for k, v in body.items() if k != "include_routed_experts"}
        return await _forward(plane, serving, "/v1/completions", body)

    @get(
        "/sync/v1/models",
        opt=ORG,
        responses=raises(InvalidInput, RunOrSamplerRequired, NotFound, Gone, (408, "policy_version_behind")),
    )
    async def models(
        self,
        request: Request,
        principal: Principal,
        sampler_id: SamplerPath,
        x_run_id: RunHeader = None,
        x_sampler_id: SamplerHeader = None,
        x_checkpoint_path: CheckpointHeader = None,
        x_min_policy_version: MinVersionHeader = None,
    ) -> ModelList:
        plane = LoopsSamplerPlane(rt(request))
        routing = _routing(request, sampler_id)
        t = await plane.target(principal, sampler_id, routing)
        return msgspec.convert(plane.models_json(await plane.serving(principal, t, routing)), ModelList)

    @post("/sync/v1/completions", opt=ORG, status_code=200, responses=raises(*_SAMPLING_ERRORS, ok=VLLMAnswer))
    async def completions(
        self,
        request: Request,
        principal: Principal,
        sampler_id: SamplerPath,
        data: CompletionsBody,
        x_run_id: RunHeader = None,
        x_sampler_id: SamplerHeader = None,
        x_checkpoint_path: CheckpointHeader = None,
        x_min_policy_version: MinVersionHeader = None,
    ) -> Response[Any]:
        return await self._openai(request, principal, sampler_id, "/v1/completions", await _raw_object(request))

    @post("/sync/v1/chat/completions", opt=ORG, status_code=200, responses=raises(*_SAMPLING_ERRORS, ok=VLLMAnswer))
    async def chat_completions(
        self,
        request: Request,
        principal: Principal,
        sampler_id: SamplerPath,
        data: CompletionsBody,
        x_run_id: RunHeader = None,
        x_sampler_id: SamplerHeader = None,
        x_checkpoint_path: CheckpointHeader = None,
        x_min_policy_version: MinVersionHeader = None,
    ) -> Response[Any]:
        return await self._openai(request, principal, sampler_id, "/v1/chat/completions", await _raw_object(request))

    async def _openai(
        self, request: Request, principal: Principal, sampler_id: str, path: str, body: dict[str, Any]
    ) -> Response[Any]:
        plane = LoopsSamplerPlane(rt(request))
        routing = _routing(request, sampler_id)
        t = await _ready(request, principal, sampler_id, plane, routing)
        return await _forward(plane, await plane.serving(principal, t, routing), path, body)

    @get("/sync/trainers_policy_version", opt=ORG, responses=raises(InvalidInput, NotFound, Gone))
    async def trainers_policy_version(
        self, request: Request, principal: Principal, sampler_id: SamplerPath
    ) -> SamplerPolicyVersion:
        plane = LoopsSamplerPlane(rt(request))
        t = await plane.dispatcher.target(principal.org_id, sampler_id, max_age=0)
        return SamplerPolicyVersion(policy_version=t.version, sampler_id=sampler_id)

    @post("/wake", opt=ORG, status_code=202, responses=raises(InvalidInput, NotFound))
    async def wake(self, request: Request, principal: Principal, sampler_id: SamplerPath) -> WakeAccepted:
        async with rt(request).db.session() as s:
            await samplers_svc.get_sampler(s, principal, sampler_id)  # 404 for another org's
        status = await request_wake(rt(request), "sampler", sampler_id)
        return WakeAccepted(sampler_id=sampler_id, status=status.value)


def _routed(request: Request) -> bool:
    h = request.headers
    return any(h.get(k) for k in ("x-run-id", "x-sampler-id", "x-checkpoint-path", "x-min-policy-version"))


class SamplerStatusController(Controller):
    """The model-deployment status route the Loops SDK polls for a dedicated sampler
    (``sampler.model_id`` / ``sampler.deployment_id`` are both the sampler's id)."""

    path = "/v1/models"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops data plane"]

    @get("/{model_id:str}/deployments/{deployment_id:str}", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def status(
        self,
        request: Request,
        principal: Principal,
        model_id: Annotated[str, path_id(m.Sampler.id)],
        deployment_id: Annotated[str, path_id(m.Sampler.id)],
    ) -> SamplerDeploymentStatus:
        async with rt(request).db.session() as s:
            smp = await samplers_svc.get_sampler(s, principal, model_id)
        if deployment_id != smp.id:
            raise NotFound("deployment", f"{deployment_id} of model {model_id}")
        return SamplerDeploymentStatus(
            id=smp.id,
            model_id=smp.id,
            name=smp.id,
            status=smp.status,
            status_reason=smp.status_reason,
            created_at=smp.created_at,
            is_production=True,
        )
