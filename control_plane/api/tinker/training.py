"""Tinker training routes: thin handlers over :class:`TrainingOps` (each returns a future)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from litestar import Controller, Request, post
from litestar.di import Provide
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType
from litestar.params import Parameter

from control_plane.api.auth import provide_principal
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.api.tinker.bootstrap import OWN, OWN_CONTROL
from control_plane.api.tinker.responses import FutureRef, ModelData, ModelInfo, OptimizerConfig
from control_plane.api.tinker.schemas import (
    CreateModelBody,
    LoadWeightsBody,
    ModelIdBody,
    OptimStepBody,
    SaveWeightsBody,
    SaveWeightsExternalBody,
    SaveWeightsForSamplerBody,
)
from control_plane.auth.principal import Principal
from control_plane.errors import Gone, InvalidInput, NotFound, PayloadTooLarge
from control_plane.training.ops import LoraRequest, Submitted, TrainingOps

# what every training op can answer: bad input, an unknown model (404), an ended one (410)
OP_ERRORS = raises(InvalidInput, PayloadTooLarge, NotFound, Gone, ok=FutureRef)


def ops(request: Request) -> TrainingOps:
    return TrainingOps(rt(request))


def _ref(sub: Submitted) -> FutureRef:
    return FutureRef(request_id=sub.request_id, model_id=sub.model_id)


def _seq(seq_id: int | None) -> int:
    if seq_id is None:
        raise InvalidInput("seq_id is required", field="seq_id")
    return seq_id


@dataclass
class ProtobufBodyOperation(Operation):
    """The operation of a route whose body is a protobuf message the handler reads itself."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description="a ForwardBackwardRequest protobuf (tinker wire protocol), zstd-compressed when "
            "Content-Encoding says so",
            content={
                "application/x-protobuf": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
                )
            },
        )


class TinkerTrainingController(Controller):
    path = "/api/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["tinker"]

    @post("/create_model", opt=OWN_CONTROL, status_code=200, responses=OP_ERRORS)
    async def create_model(self, request: Request, principal: Principal, data: CreateModelBody) -> FutureRef:
        lc = data.lora_config
        lora = (
            LoraRequest()
            if lc is None
            else LoraRequest(
                rank=lc.rank,
                seed=lc.seed,
                train_attn=lc.train_attn,
                train_mlp=lc.train_mlp,
                train_unembed=lc.train_unembed,
            )
        )
        sub = await ops(request).create_model(
            principal,
            session_id=data.session_id,
            model_seq_id=data.model_seq_id,
            base_model=data.base_model,
            lora=lora,
            optimizer_config=data.optimizer_config,
            user_metadata=data.user_metadata,
        )
        return _ref(sub)

    @post("/get_info", opt=OWN, status_code=200, responses=raises(InvalidInput, PayloadTooLarge, NotFound))
    async def get_info(self, request: Request, principal: Principal, data: ModelIdBody) -> ModelInfo:
        run = await ops(request).owned_run(principal, data.model_id)
        model = rt(request).catalog.get(run.base_model)
        return ModelInfo(
            model_id=run.id,
            model_data=ModelData(model_name=run.base_model, tokenizer_id=model.resolved_tokenizer_id),
            optimizer_config=OptimizerConfig(type="adamw"),
            is_lora=True,
            lora_rank=run.lora_rank,
            model_name=run.base_model,
        )

    @post(
        ["/forward_backward", "/forward"],
        opt=OWN,
        status_code=200,
        responses=OP_ERRORS,
        operation_class=ProtobufBodyOperation,
    )
    async def forward_backward(
        self,
        request: Request,
        principal: Principal,
        content_encoding: Annotated[Literal["zstd", "identity"] | None, Parameter(header="Content-Encoding")] = None,
    ) -> FutureRef:
        """Protobuf ForwardBackwardRequest (zstd when Content-Encoding says so). ``/forward``
        takes the same body with ``forward_only`` set (older SDKs used that path)."""
        raw = await request.body()
        sub = await ops(request).forward_backward(principal, raw, content_encoding)
        return _ref(sub)

    @post("/optim_step", opt=OWN, status_code=200, responses=OP_ERRORS)
    async def optim_step(self, request: Request, principal: Principal, data: OptimStepBody) -> FutureRef:
        sub = await ops(request).optim_step(
            principal,
            model_id=data.model_id,
            seq_id=data.seq_id,
            adam=data.adam_params if data.adam_params is not None else _adam_alias(data.optim_params),
            optimizer_params=data.optimizer_params
            if data.optimizer_params is not None
            else _other_alias(data.optim_params),
        )
        return _ref(sub)

    @post("/save_weights", opt=OWN, status_code=200, responses=OP_ERRORS)
    async def save_weights(self, request: Request, principal: Principal, data: SaveWeightsBody) -> FutureRef:
        sub = await ops(request).save(
            principal,
            model_id=data.model_id,
            seq_id=data.seq_id,
            kind="weights",
            name=data.path,
            sampling_session_seq_id=None,
            overwrite=data.overwrite,
            ttl_seconds=data.ttl_seconds,
            user_metadata=data.user_metadata,
        )
        return _ref(sub)

    @post("/save_weights_for_sampler", opt=OWN, status_code=200, responses=OP_ERRORS)
    async def save_weights_for_sampler(
        self, request: Request, principal: Principal, data: SaveWeightsForSamplerBody
    ) -> FutureRef:
        if data.kind != "snapshot":
            raise InvalidInput(
                f"sampling client kind {data.kind!r} is not supported by this server; use 'snapshot'", field="kind"
            )
        sub = await ops(request).save(
            principal,
            model_id=data.model_id,
            seq_id=data.seq_id,
            kind="sampler_weights",
            name=data.path,
            sampling_session_seq_id=data.sampling_session_seq_id,
            overwrite=True,
            ttl_seconds=data.ttl_seconds,
            user_metadata=data.user_metadata,
        )
        return _ref(sub)

    @post("/save_weights_external", opt=OWN, status_code=200, responses=OP_ERRORS)
    async def save_weights_external(
        self, request: Request, principal: Principal, data: SaveWeightsExternalBody
    ) -> FutureRef:
        """The adapter as a standard PEFT directory (``external_weights``), to download with
        ``external_weights_urls`` (what ``tinker checkpoint download`` does)."""
        sub = await ops(request).save(
            principal,
            model_id=data.model_id,
            seq_id=data.seq_id,
            kind="external_weights",
            name=data.path,
            sampling_session_seq_id=None,
            overwrite=False,
            ttl_seconds=data.ttl_seconds,
            user_metadata=None,
            encrypt_to=data.age_encryption_recipients,
        )
        return _ref(sub)

    @post("/load_weights", opt=OWN, status_code=200, responses=OP_ERRORS)
    async def load_weights(self, request: Request, principal: Principal, data: LoadWeightsBody) -> FutureRef:
        if data.weights_access_token:
            raise InvalidInput("weights_access_token is not supported by this server", field="weights_access_token")
        if data.session_id is not None or data.model_seq_id is not None:
            if data.session_id is None or data.model_seq_id is None:
                raise InvalidInput("create-via-load needs both session_id and model_seq_id", field="session_id")
            sub = await ops(request).create_from_state(
                principal,
                session_id=data.session_id,
                model_seq_id=data.model_seq_id,
                path=data.path,
                optimizer=data.optimizer,
                base_model=data.base_model,
                optimizer_config=data.optimizer_config,
                user_metadata=data.user_metadata,
            )
            return _ref(sub)
        if data.model_id is None:
            raise InvalidInput(
                "load_weights needs model_id and seq_id, or session_id and model_seq_id", field="model_id"
            )
        sub = await ops(request).load(
            principal, model_id=data.model_id, seq_id=_seq(data.seq_id), path=data.path, optimizer=data.optimizer
        )
        return _ref(sub)


def _adam_alias(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """``optim_params`` (an accepted alias) holding Adam parameters."""
    if params is None or params.get("type", "adamw") in ("adam", "adamw"):
        return params
    return None


def _other_alias(params: dict[str, Any] | None) -> dict[str, Any] | None:
    if params is None or params.get("type", "adamw") in ("adam", "adamw"):
        return None
    return params
