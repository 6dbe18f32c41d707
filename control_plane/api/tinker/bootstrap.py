"""Tinker client bootstrap and sessions: client config, telemetry, capabilities, sessions."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Controller, Request, get, post, put
from litestar.di import Provide
from litestar.params import Parameter
from sqlalchemy import select

from control_plane.api.auth import provide_principal
from control_plane.api.state import rt
from control_plane.api.tinker.schemas import (
    ClientConfigBody,
    CreateSessionBody,
    FinishSessionBody,
    SessionIdBody,
)
from control_plane.auth.principal import Principal
from control_plane.db.models import Run, Sampler, Session, TrainingProject
from control_plane.errors import Gone, InvalidInput
from control_plane.services import sessions as sessions_svc
from control_plane.services.heartbeats import record_heartbeat
from control_plane.services.scoping import list_scope_filter
from control_plane.statuses import Scope, SessionStatus

OWN = {"scope": Scope.MANAGE_OWN}
MAX_LIMIT = 1000
log = structlog.get_logger("openloops.tinker")

# Server-driven client flags (wire protocol 1.6). Chunks of one forward_backward call are
# sent in parallel and buffered by seq_id here; bodies are zstd-compressed to save bandwidth.
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": True,
    "parallel_fwdbwd_chunks": True,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}
DYNAMIC_CONFIG = {"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64}


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

    @post("/client/config", opt=OWN, status_code=200)
    async def client_config(
        self, request: Request, principal: Principal, data: ClientConfigBody | None = None
    ) -> dict[str, Any]:
        return {**CLIENT_CONFIG, "fwdbwd_max_chunk_len": rt(request).settings.tinker_fwdbwd_max_chunk_len}

    @post("/client/dynamic_config", opt=OWN, status_code=200)
    async def dynamic_config(self, principal: Principal, data: ClientConfigBody | None = None) -> dict[str, Any]:
        return dict(DYNAMIC_CONFIG)

    @post("/telemetry", opt=OWN, status_code=200)
    async def telemetry(self, principal: Principal, data: dict[str, Any]) -> dict[str, Any]:
        events = data.get("events") if isinstance(data, dict) else None
        if not isinstance(events, list):
            raise InvalidInput("events must be a list", field="events")
        errors = [ev for ev in events if isinstance(ev, dict) and ev.get("event") == "UNHANDLED_EXCEPTION"]
        for ev in errors[:5]:
            log.warning(
                "client reported an unhandled exception",
                session_id=data.get("session_id"),
                error=str(ev.get("error_message") or ev.get("error_type") or "")[:500],
            )
        return {"status": "accepted"}

    @get("/healthz", opt=OWN)
    async def healthz(self, principal: Principal) -> dict[str, Any]:
        return {"status": "ok"}

    @get("/get_server_capabilities", opt=OWN)
    async def capabilities(self, request: Request, principal: Principal) -> dict[str, Any]:
        models = [
            {
                "model_name": m.name,
                "max_context_length": m.max_context_length,
                "trainable": m.trainable,
                "sampleable": m.sampleable,
            }
            for m in rt(request).catalog.models
        ]
        return {"supported_models": models}

    @post("/create_session", opt=OWN, status_code=200)
    async def create_session(self, request: Request, principal: Principal, data: CreateSessionBody) -> dict[str, Any]:
        async with rt(request).db.transaction() as s:
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
        return {"session_id": row.id, "type": "create_session"}

    @post("/session_heartbeat", opt=OWN, status_code=200)
    async def heartbeat(self, request: Request, principal: Principal, data: SessionIdBody) -> dict[str, Any]:
        r = rt(request)
        async with r.db.session() as s:
            row = await sessions_svc.get_session(s, principal, data.session_id)
        if row.status != SessionStatus.ACTIVE.value:
            raise Gone(f"session {row.id!r} has {row.status}")
        await record_heartbeat(r.redis, row.id)
        return {"type": "session_heartbeat"}

    @post("/sessions/{session_id:str}/finish", opt=OWN, status_code=200)
    async def finish(
        self, request: Request, principal: Principal, session_id: str, data: FinishSessionBody | None = None
    ) -> dict[str, Any]:
        body = data or FinishSessionBody()
        r = rt(request)
        async with r.db.transaction() as s:
            row = await sessions_svc.finish_session(s, principal, session_id, body.reason.type, body.detail)
        await r.kick_controller()
        return {"session_id": row.id, "status": row.status, "reason": row.finish_reason}

    @get("/sessions", opt=OWN)
    async def list_sessions(
        self,
        request: Request,
        principal: Principal,
        limit: int = 20,
        offset: int = 0,
        scope_: str | None = Parameter(query="access_scope", default=None),
    ) -> dict[str, Any]:
        limit, offset = page(limit, offset)
        conds = list_scope_filter(Session, principal, access_scope(scope_))
        async with rt(request).db.session() as s:
            q = select(Session.id).where(*conds).order_by(Session.created_at.desc(), Session.id.desc())
            ids = list((await s.execute(q.limit(limit).offset(offset))).scalars())
        return {"sessions": ids}

    @get("/sessions/{session_id:str}", opt=OWN)
    async def get_session(self, request: Request, principal: Principal, session_id: str) -> dict[str, Any]:
        async with rt(request).db.session() as s:
            row = await sessions_svc.get_session(s, principal, session_id)
            runs = (await s.execute(select(Run.id).where(Run.session_id == row.id).order_by(Run.created_at))).scalars()
            smps = (
                await s.execute(select(Sampler.id).where(Sampler.session_id == row.id).order_by(Sampler.created_at))
            ).scalars()
            out = {"training_run_ids": list(runs), "sampler_ids": list(smps)}
        out |= {"user_metadata": row.user_metadata or {}, "display_name": row.display_name, "status": row.status}
        return out

    @put("/sessions/{session_id:str}/project", opt=OWN, status_code=200)
    async def set_project(
        self, request: Request, principal: Principal, session_id: str, data: dict[str, Any]
    ) -> dict[str, Any]:
        project_id = data.get("project_id") if isinstance(data, dict) else None
        if not isinstance(project_id, str) or not project_id:
            raise InvalidInput("project_id is required", field="project_id")
        async with rt(request).db.transaction() as s:
            row = await sessions_svc.get_session(s, principal, session_id)
            proj = await s.get(TrainingProject, project_id)
            if proj is None or proj.org_id != principal.org_id:
                raise InvalidInput(f"project {project_id!r} not found", field="project_id")
            row.training_project_id = proj.id
        return {"session_id": session_id, "project_id": project_id}
