"""Legacy ``/v1/trainer_sessions/*`` and ``/v1/trainers/*`` routes (2026-06-12 shapes),
mapped onto the same rows and services as the canonical ``/v1/loops/*`` routes."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.loops import presenters as p
from control_plane.api.loops.training import ORG, OWN
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.db.models import Run, Sampler
from control_plane.errors import InvalidInput, NotFound
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import runs as runs_svc
from control_plane.services import samplers as samplers_svc
from control_plane.services import sessions as sessions_svc
from control_plane.training.initial_op import enqueue_initial_op


class LegacySessionBody(msgspec.Struct, kw_only=True):
    training_project_id: str | None = None


class LegacyTrainerBody(msgspec.Struct, kw_only=True):
    model: str
    max_seq_len: int | None = None
    lora_rank: int = 64
    seed: int | None = None
    scale_down_delay_seconds: int | None = None
    checkpoint_path: str | None = None


class LegacySamplerBody(msgspec.Struct, kw_only=True):
    model: str
    max_seq_length: int | None = None
    checkpoint_path: str | None = None


class TrainerSearchBody(msgspec.Struct, kw_only=True):
    trainer_id: str


class CheckpointSearchBody(msgspec.Struct, kw_only=True):
    checkpoint_path: str


def _sampling_server(smp: Sampler | None, base_url: str) -> dict[str, Any] | None:
    if smp is None:
        return None
    return {"id": smp.id, "base_url": p.sampler_base_url(base_url, smp.id), "model_id": smp.id, "deployment_id": smp.id}


def _legacy_checkpoint(c: Any) -> dict[str, Any]:
    d = p.checkpoint_json(c)
    d["trainer_id"] = c.run_id
    return d


class LegacyController(Controller):
    path = "/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["legacy"]

    @post("/trainer_sessions", opt=ORG, status_code=200)
    async def create_session(
        self, request: Request, principal: Principal, data: LegacySessionBody | None = None
    ) -> dict[str, Any]:
        async with rt(request).db.transaction() as s:
            row = await sessions_svc.create_session(
                s, principal, origin="loops", training_project_id=data.training_project_id if data else None
            )
        return {"session": {"id": row.id}}

    @post("/trainer_sessions/{session_id:str}/trainers", opt=ORG, status_code=200)
    async def create_trainer(
        self, request: Request, principal: Principal, session_id: str, data: LegacyTrainerBody
    ) -> dict[str, Any]:
        r = rt(request)
        req = runs_svc.RunRequest(
            session_id=session_id,
            base_model=data.model,
            max_seq_len=data.max_seq_len,
            lora_rank=data.lora_rank,
            seed=data.seed,
            scale_down_delay_seconds=data.scale_down_delay_seconds,
            path=data.checkpoint_path,
        )
        async with r.db.transaction() as s:
            created = await runs_svc.create_run(
                s, principal, r.catalog, req, r.settings.default_scale_down_delay_seconds
            )
            run, smp = created.run, created.sampler
            await enqueue_initial_op(r, s, run)
        await r.kick_controller()
        trainer_url = p.trainer_base_url(r.settings.base_url, run.deployment_id) if run.deployment_id else None
        return {
            "trainer_server": {
                "id": run.id,
                "base_url": trainer_url,
                "sampling_server": _sampling_server(smp, r.settings.base_url),
            }
        }

    @post("/trainer_sessions/{session_id:str}/samplers", opt=ORG, status_code=200)
    async def create_sampler(
        self, request: Request, principal: Principal, session_id: str, data: LegacySamplerBody
    ) -> dict[str, Any]:
        r = rt(request)
        req = samplers_svc.SamplerRequest(
            session_id=session_id,
            base_model=data.model,
            max_seq_length=data.max_seq_length,
            model_path=data.checkpoint_path,
        )
        async with r.db.transaction() as s:
            smp = await samplers_svc.create_sampler(s, principal, r.catalog, req)
        await r.kick_controller()
        return {"sampling_server": _sampling_server(smp, r.settings.base_url)}

    async def _trainer_in_session(
        self, request: Request, principal: Principal, session_id: str, trainer_id: str
    ) -> Run:
        async with rt(request).db.session() as s:
            await sessions_svc.get_session(s, principal, session_id)
            run = await runs_svc.get_run(s, principal, trainer_id)
        if run.session_id != session_id:
            raise NotFound("trainer", trainer_id)
        return run

    @get("/trainer_sessions/{session_id:str}/trainers/{trainer_id:str}/checkpoints", opt=OWN)
    async def list_checkpoints(
        self, request: Request, principal: Principal, session_id: str, trainer_id: str
    ) -> dict[str, Any]:
        run = await self._trainer_in_session(request, principal, session_id, trainer_id)
        async with rt(request).db.session() as s:
            rows = await ckpt_svc.list_checkpoints(
                s, principal, run_id=run.id, base_model=None, checkpoint_path=None, scope="org"
            )
        return {"trainer_id": run.id, "checkpoints": [_legacy_checkpoint(c) for c in rows]}

    @get("/trainer_sessions/{session_id:str}/trainers/{trainer_id:str}/checkpoints/{checkpoint_id:str}/files", opt=ORG)
    async def checkpoint_files(
        self,
        request: Request,
        principal: Principal,
        session_id: str,
        trainer_id: str,
        checkpoint_id: str,
        page_size: int = 1000,
        page_token: int = 0,
    ) -> dict[str, Any]:
        run = await self._trainer_in_session(request, principal, session_id, trainer_id)
        r = rt(request)
        async with r.db.session() as s:
            ckpt = await ckpt_svc.get_checkpoint(s, principal, checkpoint_id)
            if ckpt.run_id != run.id:
                raise NotFound("checkpoint", checkpoint_id)
            page = await ckpt_svc.checkpoint_files(
                s, ckpt, page_size=page_size, page_token=page_token, url_for=r.download_url
            )
        return {"presigned_urls": page.files, "total_count": page.total_count, "next_page_token": page.next_page_token}

    @post("/trainers/search", opt=OWN, status_code=200)
    async def search_trainers(self, request: Request, principal: Principal, data: TrainerSearchBody) -> dict[str, Any]:
        async with rt(request).db.session() as s:
            rows = await runs_svc.list_runs(s, principal, run_id=data.trainer_id, scope="org")
        return {
            "trainers": [{"trainer_id": x.id, "session_id": x.session_id, "base_model": x.base_model} for x in rows]
        }

    @post("/trainers/checkpoints/search", opt=OWN, status_code=200)
    async def search_checkpoint(
        self, request: Request, principal: Principal, data: CheckpointSearchBody
    ) -> dict[str, Any]:
        async with rt(request).db.session() as s:
            rows = await ckpt_svc.list_checkpoints(
                s, principal, run_id=None, base_model=None, checkpoint_path=data.checkpoint_path, scope="org"
            )
        if not rows:
            raise InvalidInput(f"checkpoint {data.checkpoint_path!r} not found", field="checkpoint_path")
        return {"checkpoint": _legacy_checkpoint(rows[0])}
