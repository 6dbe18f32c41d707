"""Tinker sampling routes: create_sampling_session, GET samplers/{id}, asample (wire protocol 7).

``asample`` validates the request (400 before any future exists), admits it against the shared
server's in-flight bound (429 beyond it: the SDK backs off and resubmits), and answers at once
with ``{"request_id", "sample_sequence_ids"}``; the sampling itself runs in the background and
completes the future (``retrieve_future``) with the ``SampleResponse`` protobuf.
``compute_logprobs`` is an ``asample`` with ``prompt_logprobs``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import Provide
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import KwargDefinition as Doc

from control_plane.api.auth import provide_principal
from control_plane.api.fields import items, path_id
from control_plane.api.openapi import raises
from control_plane.api.request import CONTROL_BODY
from control_plane.api.state import rt
from control_plane.api.tinker.responses import SamplerInfo, SampleSubmitted, SamplingSessionCreated
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import Conflict, Gone, InvalidInput, NotFound, PayloadTooLarge
from control_plane.fields import INT32_MAX, INT64_MIN, CheckpointPath, ModelName, NonNegInt64, SamplerId, SessionId
from control_plane.sampling.dispatcher import dispatcher_for
from control_plane.sampling.errors import InvalidSampleRequest, SamplerBusy, UnsupportedSampleFeature
from control_plane.sampling.translate import MAX_NUM_SAMPLES, parse_sample_request
from control_plane.services import admission
from control_plane.services import checkpoints as checkpoints_svc
from control_plane.services import sessions as sessions_svc
from control_plane.services.samplers import get_sampler
from control_plane.services.sampling_sessions import open_sampling_session
from control_plane.statuses import Scope, SessionStatus
from data_plane.sampler.config import DEFAULT_MAX_LOGPROBS
from data_plane.wire.paths import PathError, parse_checkpoint_path

OWN = {"scope": Scope.MANAGE_OWN}
MAX_TOP_LOGPROBS = DEFAULT_MAX_LOGPROBS  # the sampler's --max-logprobs
# a uint64 seed (the SDK's), as far as a JSON-Schema bound states it exactly
MAX_SEED = 2**64 - 2048
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]


class CreateSamplingSessionBody(msgspec.Struct, kw_only=True):
    session_id: SessionId
    sampling_session_seq_id: NonNegInt64
    base_model: ModelName | None = None  # one of base_model and model_path is required
    model_path: CheckpointPath | None = None


class EncodedTextChunk(msgspec.Struct, kw_only=True):
    type: Literal["encoded_text"] = "encoded_text"  # text only: image chunks are refused
    tokens: Annotated[list[TokenId], items(OpenAPIType.INTEGER, minimum=0, maximum=INT32_MAX)]


class ModelInputBody(msgspec.Struct, kw_only=True):
    chunks: Annotated[list[EncodedTextChunk], msgspec.Meta(min_length=1)]


class SamplingParamsBody(msgspec.Struct, kw_only=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] | None = None
    # msgspec itself refuses what does not fit in [-2^63, 2^64): the bounds are stated for the schema
    seed: Annotated[int, Doc(ge=INT64_MIN, le=MAX_SEED)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)] = -1  # -1: no limit
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    # strings, or token ids (not a mix); [] disables every stop, EOS included
    stop: str | list[str | Annotated[int, msgspec.Meta(ge=0)]] | None = None


class SampleBody(msgspec.Struct, kw_only=True):
    """A Tinker ``SampleRequest``. The handler reads the body as sent (``parse_sample_request``);
    this type is what the edge checks first."""

    sampling_session_id: SamplerId
    seq_id: NonNegInt64 = 0
    num_samples: Annotated[int, msgspec.Meta(ge=1, le=MAX_NUM_SAMPLES)] = 1
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: TopLogprobs | None = None
    topk_sample_logprobs: TopLogprobs | None = None
    # not supported by this server (refused when set)
    prompt_alt_tokens_k: Annotated[int, Doc(ge=0, le=0)] | None = None
    prompt_logprobs_last_n: Annotated[Any, Doc(description="not supported: leave it out")] = None
    target_prompt_logprobs: Annotated[Any, Doc(description="not supported: leave it out")] = None
    record_stability_info: Annotated[bool, Doc(description="not supported: false")] = False


class TinkerSamplingController(Controller):
    path = "/api/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["tinker"]

    @post(
        "/create_sampling_session",
        opt={**OWN, **CONTROL_BODY},
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound, Conflict),
    )
    async def create_sampling_session(
        self, request: Request, principal: Principal, data: CreateSamplingSessionBody
    ) -> SamplingSessionCreated:
        r = rt(request)
        if data.base_model is None and data.model_path is None:
            raise InvalidInput("one of base_model or model_path is required", field="base_model")
        async with r.db.transaction() as s:
            session = await sessions_svc.get_session(s, principal, data.session_id)
            if session.status != SessionStatus.ACTIVE.value:
                raise InvalidInput(f"session {session.id!r} is {session.status}", field="session_id")
            ckpt = None
            base_model = data.base_model
            if data.model_path is not None:
                try:
                    ref = parse_checkpoint_path(data.model_path)
                except PathError as exc:
                    raise InvalidInput(str(exc), field="model_path") from exc
                ckpt = await checkpoints_svc.find_by_ref(s, principal.org_id, ref)
                if ckpt is None:
                    raise NotFound("checkpoint", data.model_path)
                if base_model is not None and base_model != ckpt.base_model:
                    raise InvalidInput(
                        f"model_path {data.model_path!r} was trained on {ckpt.base_model}, not {base_model}",
                        field="base_model",
                    )
                base_model = ckpt.base_model
            assert base_model is not None
            model = r.catalog.get(base_model)
            if not model.sampleable:
                raise InvalidInput(f"base model {base_model!r} cannot be sampled", field="base_model")
            async with admission.workload(s, r.settings, r.catalog, principal.org_id):
                smp = await open_sampling_session(
                    s,
                    org_id=principal.org_id,
                    created_by=principal.principal_id,
                    session_id=session.id,
                    seq_id=data.sampling_session_seq_id,
                    base_model=model.name,
                    checkpoint=ckpt,
                )
        await r.kick_controller()
        return SamplingSessionCreated(sampling_session_id=smp.id)

    @get("/samplers/{sampler_id:str}", opt=OWN, responses=raises(InvalidInput, NotFound))
    async def get_sampler(
        self, request: Request, principal: Principal, sampler_id: Annotated[str, path_id(m.Sampler.id)]
    ) -> SamplerInfo:
        async with rt(request).db.session() as s:
            smp = await get_sampler(s, principal, sampler_id)
        return SamplerInfo(sampler_id=smp.id, base_model=smp.base_model, model_path=smp.model_path)

    @post(
        "/asample",
        opt=OWN,
        status_code=200,
        responses=raises(
            InvalidInput, InvalidSampleRequest, UnsupportedSampleFeature, PayloadTooLarge, NotFound, Gone, SamplerBusy
        ),
    )
    async def asample(self, request: Request, principal: Principal, data: SampleBody) -> SampleSubmitted:
        """Admit one sample request; its outcome is the future's (``retrieve_future``)."""
        spec = parse_sample_request(await request.json())  # the body as sent: its typed form passed the edge
        if data.record_stability_info:
            raise InvalidSampleRequest(
                "record_stability_info is not supported by this server (StableReinforce is not implemented); "
                "use loss_fn='importance_sampling'"
            )
        sid = data.sampling_session_id
        d = dispatcher_for(rt(request))
        target = await d.target(principal.org_id, sid)
        if target.ended:
            raise InvalidInput(
                f"sampler {sid!r} is {target.status.value}"
                + (f" ({target.status_reason})" if target.status_reason else "")
                + "; create a new sampling client",
                field="sampling_session_id",
            )
        request_id, sequence_ids = await d.submit(target, spec)
        return SampleSubmitted(request_id=request_id, sample_sequence_ids=sequence_ids)


SAMPLING_HANDLERS = [TinkerSamplingController]
