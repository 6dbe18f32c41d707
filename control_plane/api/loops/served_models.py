"""Served models (an openloops extension of the Loops API): deploy sampler checkpoints as an
OpenAI-compatible model (``POST /v1/loops/checkpoints/deploy``), list, get, deactivate and
meter them, and their OpenAI-compatible API at ``base_url`` =
``/v1/loops/served_models/{id}/openai/v1`` (``/models``, ``/chat/completions``,
``/completions``), for any API key of the served model's org.

Thin routes: the serving logic is :mod:`control_plane.sampling.served_proxy`, the rows
:mod:`control_plane.services.served_models`."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.di import Provide
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import Parameter
from litestar.response import Stream

from control_plane.api.auth import provide_principal
from control_plane.api.errors import http_status_of
from control_plane.api.fields import path_id, query_text
from control_plane.api.loops import presenters as p
from control_plane.api.loops.responses import (
    OpenAIModelList,
    ServedModelDeployed,
    ServedModelEnvelope,
    ServedModelList,
    ServedModelMetrics,
)
from control_plane.api.loops.schemas import DeployCheckpointsBody, MetricsBody
from control_plane.api.loops.training import ORG, ORG_CREATE, ListScope
from control_plane.api.openapi import OptionalBodyOperation, raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import Gone, InvalidInput, NotFound, PayloadTooLarge, Unavailable
from control_plane.metering import series
from control_plane.metering.requests import TokenTap
from control_plane.sampling.errors import SamplerFailed, SamplerUnavailable
from control_plane.sampling.served_proxy import open_upstream, served_proxy_for
from control_plane.services import admission
from control_plane.services import served_models as sm_svc

ServedModelPath = Annotated[str, path_id(m.ServedModel.id, "the served model's id")]
PageToken = Annotated[str | None, query_text(max_length=200, description="the next_page_token of the previous page")]
PageSize = Annotated[int, Parameter(ge=1, le=sm_svc.MAX_PAGE_SIZE)]


class ServedModelsController(Controller):
    path = "/v1/loops"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["served models"]

    @post(
        "/checkpoints/deploy",
        opt=ORG_CREATE,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound),
    )
    async def deploy(self, request: Request, principal: Principal, data: DeployCheckpointsBody) -> ServedModelDeployed:
        """Serve sampler_weights checkpoints of one base model as an OpenAI-compatible model of
        its own (not idempotent: every call makes a new one). Clients name a checkpoint by its
        name in ``model``; ``base_url`` is the root of its OpenAI-compatible API."""
        r = rt(request)
        async with r.db.transaction() as s:
            async with admission.workload(s, r.settings, r.catalog, principal.org_id):
                served = await sm_svc.deploy(
                    s,
                    principal,
                    r.catalog,
                    checkpoint_ids=list(data.checkpoint_ids),
                    model_name=data.model_name,
                    instance_type_id=data.instance_type_id,
                    hf_secret_name=data.hf_secret_name,
                    scale_down_delay_seconds=data.scale_down_delay_seconds
                    or r.settings.default_scale_down_delay_seconds,
                )
            users = await p.principal_names(s, {served.model.created_by})
        await r.kick_controller()
        out = p.served_model_json(served, r.settings.base_url, users)
        return ServedModelDeployed(
            model_id=out.model_id, deployment_id=out.deployment_id, base_url=out.base_url, served_model=out
        )

    @get("/served_models", opt=ORG, responses=raises(InvalidInput))
    async def list_served_models(
        self,
        request: Request,
        principal: Principal,
        visibility: ListScope = None,
        limit: PageSize = sm_svc.MAX_PAGE_SIZE,
        page_token: PageToken = None,
    ) -> ServedModelList:
        """Newest first; ``next_page_token`` fetches the next page."""
        r = rt(request)
        async with r.db.session() as s:
            page = await sm_svc.list_served_models(s, principal, scope=visibility, limit=limit, page_token=page_token)
            users = await p.principal_names(s, {x.model.created_by for x in page.items})
        return ServedModelList(
            [p.served_model_json(x, r.settings.base_url, users) for x in page.items], page.next_page_token
        )

    @get("/served_models/{served_model_id:str}", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def get_served_model(
        self, request: Request, principal: Principal, served_model_id: ServedModelPath
    ) -> ServedModelEnvelope:
        r = rt(request)
        async with r.db.session() as s:
            served = await sm_svc.get_served(s, principal, served_model_id)
            users = await p.principal_names(s, {served.model.created_by})
        return ServedModelEnvelope(p.served_model_json(served, r.settings.base_url, users))

    @post(
        "/served_models/{served_model_id:str}/deactivate",
        opt=ORG,
        status_code=200,
        responses=raises(InvalidInput, NotFound),
    )
    async def deactivate_served_model(
        self, request: Request, principal: Principal, served_model_id: ServedModelPath
    ) -> ServedModelEnvelope:
        """Stop its server; it answers 410 from then on. Its checkpoints stay."""
        r = rt(request)
        async with r.db.transaction() as s:
            await sm_svc.deactivate_served_model(s, principal, served_model_id)
            served = await sm_svc.get_served(s, principal, served_model_id)
            users = await p.principal_names(s, {served.model.created_by})
        served_proxy_for(r).forget(served_model_id)  # after the commit: no request re-caches it serving
        await r.kick_controller()
        return ServedModelEnvelope(p.served_model_json(served, r.settings.base_url, users))

    @post(
        "/served_models/{served_model_id:str}/metrics",
        opt=ORG,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound),
        operation_class=OptionalBodyOperation,
    )
    async def served_model_metrics(
        self, request: Request, principal: Principal, served_model_id: ServedModelPath, data: MetricsBody | None = None
    ) -> ServedModelMetrics:
        """Request volume, concurrency, latency p50/p95/p99 and status classes of its API, and
        its server's CPU, memory and disk (the shape of Loops' deployment metrics)."""
        window = (data or MetricsBody()).window()
        async with rt(request).db.session() as s:
            sm = await sm_svc.get_served_model(s, principal, served_model_id)
            metrics = await series.deployment_metrics(s, sm_svc.RESOURCE, sm.id, window)
        return ServedModelMetrics(deployment_id=sm.id, metrics=metrics)


class _AnyJsonBody(Operation):
    """The body of an OpenAI completion request: any JSON object (vLLM checks its fields; the
    proxy reads only ``model`` and ``stream``)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            content={
                "application/json": OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        description="an OpenAI completion request; model: a checkpoint name or the base model",
                    )
                )
            },
        )


# what a completion route answers: vLLM's own answer (JSON, or server-sent events when
# ``stream`` is true), passed through, and these errors
_SERVING = raises(
    InvalidInput,
    PayloadTooLarge,
    NotFound,
    Gone,
    Unavailable,
    SamplerUnavailable,
    SamplerFailed,
    ok=dict[str, Any],
    ok_description="vLLM's answer as it is (with stream: true, text/event-stream ending data: [DONE])",
)


class ServedModelOpenAIController(Controller):
    """The OpenAI-compatible API of a served model."""

    path = "/v1/loops/served_models/{served_model_id:str}/openai/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["served models"]

    @get("/models", responses=raises(InvalidInput, NotFound))
    async def models(self, request: Request, principal: Principal, served_model_id: ServedModelPath) -> OpenAIModelList:
        """Its models: each checkpoint by name, and the base model."""
        async with rt(request).db.session() as s:
            served = await sm_svc.get_served(s, principal, served_model_id)
        return p.openai_models_json(served)

    @post(
        "/chat/completions",
        status_code=200,
        responses=_SERVING,
        operation_class=_AnyJsonBody,
    )
    async def chat_completions(
        self, request: Request, principal: Principal, served_model_id: ServedModelPath
    ) -> Response[Any]:
        """OpenAI chat completions (``stream: true`` answers server-sent events)."""
        return await _complete(request, principal, served_model_id, "/v1/chat/completions")

    @post(
        "/completions",
        status_code=200,
        responses=_SERVING,
        operation_class=_AnyJsonBody,
    )
    async def completions(
        self, request: Request, principal: Principal, served_model_id: ServedModelPath
    ) -> Response[Any]:
        """OpenAI completions (``stream: true`` answers server-sent events)."""
        return await _complete(request, principal, served_model_id, "/v1/completions")


async def _complete(request: Request, principal: Principal, served_model_id: str, path: str) -> Response[Any]:
    r = rt(request)
    proxy = served_proxy_for(r)
    raw = await request.body()
    tracking = r.meter.track(sm_svc.RESOURCE, served_model_id)
    out = tracking.__enter__()
    try:
        up = await proxy.prepare(principal, served_model_id, raw)
        opened = await open_upstream(up, path)
    except BaseException as exc:
        out.status = http_status_of(exc)
        tracking.__exit__(None, None, None)
        raise
    out.status = opened.status
    tap = TokenTap(opened.content_type, up.n)

    async def body() -> Any:
        try:
            async for chunk in opened.body:
                tap.feed(chunk)
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await opened.body.aclose()
            try:
                if opened.status < 400:
                    out.tokens = tap.tokens()
            finally:  # the request is counted whatever the tap made of its answer
                tracking.__exit__(None, None, None)

    return Stream(body(), status_code=opened.status, media_type=opened.content_type)
