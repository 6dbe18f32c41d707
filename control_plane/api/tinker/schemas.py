"""Request bodies of the Tinker service API (shapes from the tinker SDK's request types), with
their limits (:mod:`control_plane.fields`). Unknown fields are ignored; ``type``
discriminators are accepted and not checked.

Limits written ``Doc(...)`` are checked by the training op itself, after its seq id is known,
so that a refused op still fills its seq slot (:meth:`TrainingOps._op`): the OpenAPI shows
them, the edge does not enforce them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import KwargDefinition as Doc

from control_plane.api.fields import items
from control_plane.fields import (
    CHECKPOINT_PATH,
    INT64_MAX,
    NO_NUL,
    CheckpointPath,
    DisplayName,
    Int64,
    ModelName,
    NonNegInt32,
    ProjectId,
    RunId,
    SdkVersion,
    SessionId,
    Text,
    check_json,
)
from control_plane.services.runs import MAX_LORA_RANK
from control_plane.services.sessions import FINISH_REASONS
from control_plane.training.ops import MAX_SEQ_ID, MAX_TTL_SECONDS
from data_plane.wire.paths import NAME_RE

# the seq id of a training op: the SDK numbers them from 1
SeqId = Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ_ID)]
TtlSeconds = Annotated[int, Doc(ge=1, le=MAX_TTL_SECONDS)]
Metadata = dict[str, Any]  # free-form JSON: no NUL, nested at most fields.MAX_JSON_DEPTH deep


class ClientConfigBody(msgspec.Struct, kw_only=True):
    sdk_version: Text | None = None


class CreateSessionBody(msgspec.Struct, kw_only=True):
    tags: Annotated[list[Text], items(OpenAPIType.STRING, pattern=NO_NUL)] = msgspec.field(default_factory=list)
    user_metadata: Metadata = msgspec.field(default_factory=dict)
    sdk_version: SdkVersion | None = None
    project_id: ProjectId | None = None
    display_name: DisplayName | None = None

    def __post_init__(self) -> None:
        check_json(self.user_metadata, "user_metadata")


class SessionIdBody(msgspec.Struct, kw_only=True):
    session_id: SessionId


class FinishReason(msgspec.Struct, kw_only=True):
    type: Literal[FINISH_REASONS] = "success"  # type: ignore[valid-type]


class FinishSessionBody(msgspec.Struct, kw_only=True):
    reason: FinishReason = msgspec.field(default_factory=FinishReason)
    detail: Text | None = None


class LoraConfigBody(msgspec.Struct, kw_only=True):
    rank: Annotated[int, msgspec.Meta(ge=1, le=MAX_LORA_RANK)] = 32
    seed: Int64 | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelBody(msgspec.Struct, kw_only=True):
    session_id: SessionId
    model_seq_id: NonNegInt32
    base_model: ModelName
    user_metadata: Metadata | None = None
    lora_config: LoraConfigBody | None = None
    optimizer_config: dict[str, Any] | None = None  # {"type": "adamw"}

    def __post_init__(self) -> None:
        check_json(self.user_metadata, "user_metadata")


class ModelIdBody(msgspec.Struct, kw_only=True):
    model_id: RunId


class OptimStepBody(msgspec.Struct, kw_only=True):
    model_id: RunId
    seq_id: SeqId
    adam_params: dict[str, Any] | None = None
    optim_params: dict[str, Any] | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeightsBody(msgspec.Struct, kw_only=True):
    model_id: RunId
    path: Annotated[str, Doc(max_length=200, pattern=NAME_RE.pattern)] | None = None  # the checkpoint's name
    seq_id: SeqId
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: Metadata | None = None

    def __post_init__(self) -> None:
        check_json(self.user_metadata, "user_metadata")


class SaveWeightsForSamplerBody(msgspec.Struct, kw_only=True):
    model_id: RunId
    path: Annotated[str, Doc(max_length=200, pattern=NAME_RE.pattern)] | None = None
    sampling_session_seq_id: Annotated[int, Doc(ge=0, le=INT64_MAX)] | None = None  # for an unnamed save
    kind: Annotated[Literal["snapshot"], Doc(description="the sampling client kind: only snapshot")] = "snapshot"
    seq_id: SeqId
    ttl_seconds: TtlSeconds | None = None
    user_metadata: Metadata | None = None

    def __post_init__(self) -> None:
        check_json(self.user_metadata, "user_metadata")


class SaveWeightsExternalBody(msgspec.Struct, kw_only=True):
    model_id: RunId
    path: Annotated[str, Doc(max_length=200, pattern=NAME_RE.pattern)] | None = None  # the export's name
    seq_id: SeqId
    ttl_seconds: TtlSeconds | None = None
    # age encryption of the exported files: not supported (refused when non-empty)
    age_encryption_recipients: Annotated[list[Text], items(OpenAPIType.STRING, pattern=NO_NUL)] = msgspec.field(
        default_factory=list
    )


class LoadWeightsBody(msgspec.Struct, kw_only=True):
    # checked by the op (a malformed path fills the op's seq slot); a NUL is refused at once
    path: Annotated[str, Doc(pattern=CHECKPOINT_PATH)]
    optimizer: bool = False
    model_id: RunId | None = None
    seq_id: SeqId | None = None
    session_id: SessionId | None = None
    model_seq_id: NonNegInt32 | None = None
    base_model: ModelName | None = None
    user_metadata: Metadata | None = None
    optimizer_config: dict[str, Any] | None = None
    weights_access_token: Text | None = None  # not supported

    def __post_init__(self) -> None:
        check_json(self.path, "path")
        check_json(self.user_metadata, "user_metadata")


class RetrieveFutureBody(msgspec.Struct, kw_only=True):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_NUL)]
    allow_metadata_only: bool = False


class WeightsInfoBody(msgspec.Struct, kw_only=True):
    tinker_path: CheckpointPath


class CheckpointTtlBody(msgspec.Struct, kw_only=True):
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=MAX_TTL_SECONDS)] | None = None  # null: never expires


class TelemetryBody(msgspec.Struct, kw_only=True):
    events: list[dict[str, Any]]
    session_id: Text | None = None


class SetProjectBody(msgspec.Struct, kw_only=True):
    project_id: Annotated[ProjectId, msgspec.Meta(min_length=1)]
