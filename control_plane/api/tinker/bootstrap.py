"""Tinker client bootstrap and sessions: client config, telemetry, capabilities, sessions."""

from __future__ import annotations

from typing import Annotated, Literal

import structlog
from litestar import Controller, Request, get, post, put
from litestar.di import Provide
from litestar.params import Parameter
from sqlalchemy import select

from control_plane.api.auth import provide_principal
from control_plane.api.fields import path_id, query_int
from control_plane.api.openapi import OptionalBodyOperation, raises
from control_plane.api.request import CONTROL_BODY
from control_plane.api.state import rt
from control_plane.api.tinker.responses import (
    Accepted,
    ClientConfig,
    DynamicConfig,
    Healthy,
    HeartbeatAck,
    ProjectSet,
    ServerCapabilities,
    SessionCreated,
    SessionFinished,
    SessionList,
    SupportedModel,
    TinkerSession,
)
from control_plane.api.tinker.schemas import (
    ClientConfigBody,
    CreateSessionBody,
    FinishSessionBody,
    SessionIdBody,
    SetProjectBody,
    TelemetryBody,
)
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.db.models import Run, Sampler, Session, TrainingProject
from control_plane.errors import Gone, InvalidInput, NotFound, PayloadTooLarge
from control_plane.fields import INT64_MAX
from control_plane.services import admission
from control_plane.services import sessions as sessions_svc
from control_plane.services.heartbeats import record_heartbeat
from control_plane.services.scoping import list_scope_filter
from control_plane.statuses import Scope, SessionStatus

OWN = {"scope": Scope.MANAGE_OWN}
OWN_CONTROL = {**OWN, **CONTROL_BODY}  # a route whose body is a few fields
MAX_LIMIT = 1000
log = structlog.get_logger("openloops.tinker")

# Server-driven client flags (wire protocol 1.6). Chunks of one forward_backward call are
# sent in parallel and buffered by seq_id here; bodies are zstd-compressed to save bandwidth.
# forward_backward bodies are protobuf only: SDKs 0.20-0.24 need proto_write_fwdbwd (else they
# send JSON) and fwd_via_fwdbwd (forward as forward_only on /forward_backward; 0.22.3 on).
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_write_fwdbwd": True,
    "fwd_via_fwdbwd": True,
    "proto_compress_fwdbwd": True,
    "parallel_fwdbwd_chunks": True,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}
DYNAMIC_CONFIG = DynamicConfig(refresh_interval_sec=300, sample_cancel_enabled=False, sample_cancel_max_batch_size=64)

Limit = Annotated[int, query_int(ge=1, le=MAX_LIMIT)]
Offset = Annotated[int, query_int(ge=0, le=INT64_MAX)]
# Tinker's access_scope: the caller's own rows (owned, the default) or the org's (accessible)
AccessScope = Annotated[Literal["owned", "accessible"] | None, Parameter(query="access_scope")]
SessionPath = Annotated[str, path_id(m.Session.id)]


def access_scope(value: str | None) -> str | None:
    """Tinker's ``access_scope`` (owned | accessible) as our list scope (own | org)."""
    if value in (None, "", "owned"):
        return None
    if value == "accessible":
        return "org"
    raise InvalidInput("access_scope must be 'owned' or 'accessible'", field="access_scope")


def page(limit: int, offset: int) -> tuple[int, int]:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
    if offset < 0:
        raise InvalidInput("offset must be >= 0", field="offset")
    return limit, offset


class TinkerBootstrapController(Controller):
    path = "/api/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["tinker"]

    @post(
        "/client/config",
        opt=OWN,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge),
        operation_class=OptionalBodyOperation,
    )
    async def client_config(
        self, request: Request, principal: Principal, data: ClientConfigBody | None = None
    ) -> ClientConfig:
        return ClientConfig(**CLIENT_CONFIG, fwdbwd_max_chunk_len=rt(request).settings.tinker_fwdbwd_max_chunk_len)

    @post(
        "/client/dynamic_config",
        opt=OWN,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge),
        operation_class=OptionalBodyOperation,
    )
    async def dynamic_config(self, principal: Principal, data: ClientConfigBody | None = None) -> DynamicConfig:
        return DYNAMIC_CONFIG

    @post("/telemetry", opt=OWN, status_code=200, responses=raises(InvalidInput, PayloadTooLarge))
    async def telemetry(self, principal: Principal, data: TelemetryBody) -> Accepted:
        errors = [ev for ev in data.events if ev.get("event") == "UNHANDLED_EXCEPTION"]
        for ev in errors[:5]:
            log.warning(
                "client reported an unhandled exception",
                session_id=data.session_id,
                error=str(ev.get("error_message") or ev.get("error_type") or "")[:500],
            )
        return Accepted(status="accepted")

    @get("/healthz", opt=OWN, responses=raises())
    async def healthz(self, principal: Principal) -> Healthy:
        return Healthy(status="ok")

    @get("/get_server_capabilities", opt=OWN, responses=raises())
    async def capabilities(self, request: Request, principal: Principal) -> ServerCapabilities:
        return ServerCapabilities(
            [
                SupportedModel(
                    model_name=x.name,
                    max_context_length=x.max_context_length,
                    trainable=x.trainable,
                    sampleable=x.sampleable,
                )
                for x in rt(request).catalog.models
            ]
        )

    @post("/create_session", opt=OWN_CONTROL, status_code=200, responses=raises(InvalidInput, PayloadTooLarge))
    async def create_session(self, request: Request, principal: Principal, data: CreateSessionBody) -> SessionCreated:
        r = rt(request)
        async with r.db.transaction() as s:
            await admission.session(s, r.settings, principal.org_id)
            row = await sessions_svc.create_session(
                s,
                principal,
                origin="tinker",
                training_project_id=data.project_id,
                tags=data.tags,
                user_metadata=data.user_metadata,
                sdk_version=data.sdk_version,
                display_name=data.display_name,
            )
        return SessionCreated(session_id=row.id)

    @post(
        "/session_heartbeat",
        opt=OWN_CONTROL,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound, Gone),
    )
    async def heartbeat(self, request: Request, principal: Principal, data: SessionIdBody) -> HeartbeatAck:
        r = rt(request)
        async with r.db.session() as s:
            row = await sessions_svc.get_session(s, principal, data.session_id)
        if row.status != SessionStatus.ACTIVE.value:
            raise Gone(f"session {row.id!r} has {row.status}")
        await record_heartbeat(r.redis, row.id)
        return HeartbeatAck()

    @post(
        "/sessions/{session_id:str}/finish",
        opt=OWN,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound),
        operation_class=OptionalBodyOperation,
    )
    async def finish(
        self, request: Request, principal: Principal, session_id: SessionPath, data: FinishSessionBody | None = None
    ) -> SessionFinished:
        body = data or FinishSessionBody()
        r = rt(request)
        async with r.db.transaction() as s:
            row = await sessions_svc.finish_session(s, principal, session_id, body.reason.type, body.detail)
        await r.kick_controller()
        return SessionFinished(session_id=row.id, status=row.status, reason=row.finish_reason)

    @get("/sessions", opt=OWN, responses=raises(InvalidInput))
    async def list_sessions(
        self,
        request: Request,
        principal: Principal,
        limit: Limit = 20,
        offset: Offset = 0,
        scope_: AccessScope = None,
    ) -> SessionList:
        limit, offset = page(limit, offset)
        conds = list_scope_filter(Session, principal, access_scope(scope_))
        async with rt(request).db.session() as s:
            q = select(Session.id).where(*conds).order_by(Session.created_at.desc(), Session.id.desc())
            ids = list((await s.execute(q.limit(limit).offset(offset))).scalars())
        return SessionList(ids)

    @get("/sessions/{session_id:str}", opt=OWN, responses=raises(InvalidInput, NotFound))
    async def get_session(self, request: Request, principal: Principal, session_id: SessionPath) -> TinkerSession:
        async with rt(request).db.session() as s:
            row = await sessions_svc.get_session(s, principal, session_id)
            runs = (await s.execute(select(Run.id).where(Run.session_id == row.id).order_by(Run.created_at))).scalars()
            smps = (
                await s.execute(select(Sampler.id).where(Sampler.session_id == row.id).order_by(Sampler.created_at))
            ).scalars()
            return TinkerSession(
                training_run_ids=list(runs),
                sampler_ids=list(smps),
                user_metadata=row.user_metadata or {},
                display_name=row.display_name,
                status=row.status,
            )

    @put(
        "/sessions/{session_id:str}/project",
        opt=OWN,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound),
    )
    async def set_project(
        self, request: Request, principal: Principal, session_id: SessionPath, data: SetProjectBody
    ) -> ProjectSet:
        project_id = data.project_id
        async with rt(request).db.transaction() as s:
            row = await sessions_svc.get_session(s, principal, session_id)
            proj = await s.get(TrainingProject, project_id)
            if proj is None or proj.org_id != principal.org_id:
                raise InvalidInput(f"project {project_id!r} not found", field="project_id")
            row.training_project_id = proj.id
        return ProjectSet(session_id=session_id, project_id=project_id)
