"""Legacy ``/v1/trainer_sessions/*`` and ``/v1/trainers/*`` routes (2026-06-12 shapes),
mapped onto the same rows and services as the canonical ``/v1/loops/*`` routes."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.fields import path_id
from control_plane.api.loops import presenters as p
from control_plane.api.loops.resources import PageSize, PageToken, files_page
from control_plane.api.loops.responses import (
    CheckpointFiles,
    CheckpointFound,
    LegacyCheckpointList,
    SamplerCreated,
    SamplingServer,
    SessionCreated,
    SessionRef,
    TrainerCreated,
    TrainerRef,
    TrainerSearch,
    TrainerServer,
)
from control_plane.api.loops.schemas import LoraRank, ScaleDownDelay
from control_plane.api.loops.training import ORG, ORG_CREATE, OWN, CheckpointIdPath, SessionPath
from control_plane.api.openapi import OptionalBodyOperation, raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.db.models import Run, Sampler
from control_plane.errors import InvalidInput, NotFound, PayloadTooLarge
from control_plane.fields import CheckpointPath, CheckpointPathOrEmpty, Int64, ModelName, PosInt32, ProjectId, RunId
from control_plane.services import admission
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import runs as runs_svc
from control_plane.services import samplers as samplers_svc
from control_plane.services import sessions as sessions_svc
from control_plane.training.initial_op import enqueue_initial_op


class LegacySessionBody(msgspec.Struct, kw_only=True):
    training_project_id: ProjectId | None = None


class LegacyTrainerBody(msgspec.Struct, kw_only=True):
    model: ModelName
    max_seq_len: PosInt32 | None = None
    lora_rank: LoraRank = 64
    seed: Int64 | None = None
    scale_down_delay_seconds: ScaleDownDelay | None = None
    checkpoint_path: CheckpointPathOrEmpty | None = None


class LegacySamplerBody(msgspec.Struct, kw_only=True):
    model: ModelName
    max_seq_length: PosInt32 | None = None
    checkpoint_path: CheckpointPathOrEmpty | None = None


class TrainerSearchBody(msgspec.Struct, kw_only=True):
    trainer_id: RunId


class CheckpointSearchBody(msgspec.Struct, kw_only=True):
    checkpoint_path: CheckpointPath


TrainerPath = Annotated[str, path_id(m.Run.id)]


def _sampling_server(smp: Sampler | None, base_url: str) -> SamplingServer | None:
    if smp is None:
        return None
    return SamplingServer(
        id=smp.id, base_url=p.sampler_base_url(base_url, smp.id), model_id=smp.id, deployment_id=smp.id
    )


class LegacyController(Controller):
    path = "/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["legacy"]

    @post(
        "/trainer_sessions",
        opt=ORG_CREATE,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge),
        operation_class=OptionalBodyOperation,
    )
    async def create_session(
        self, request: Request, principal: Principal, data: LegacySessionBody | None = None
    ) -> SessionCreated:
        r = rt(request)
        async with r.db.transaction() as s:
            await admission.session(s, r.settings, principal.org_id)
            row = await sessions_svc.create_session(
                s, principal, origin="loops", training_project_id=data.training_project_id if data else None
            )
        return SessionCreated(SessionRef(row.id))

    @post(
        "/trainer_sessions/{session_id:str}/trainers",
        opt=ORG_CREATE,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound),
    )
    async def create_trainer(
        self, request: Request, principal: Principal, session_id: SessionPath, data: LegacyTrainerBody
    ) -> TrainerCreated:
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
            async with admission.run(s, r.settings, r.catalog, principal.org_id):
                created = await runs_svc.create_run(
                    s, principal, r.catalog, req, r.settings.default_scale_down_delay_seconds
                )
            run, smp = created.run, created.sampler
            await enqueue_initial_op(r, s, run)
        await r.kick_controller()
        trainer_url = p.trainer_base_url(r.settings.base_url, run.deployment_id) if run.deployment_id else None
        return TrainerCreated(
            TrainerServer(id=run.id, base_url=trainer_url, sampling_server=_sampling_server(smp, r.settings.base_url))
        )

    @post(
        "/trainer_sessions/{session_id:str}/samplers",
        opt=ORG_CREATE,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound),
    )
    async def create_sampler(
        self, request: Request, principal: Principal, session_id: SessionPath, data: LegacySamplerBody
    ) -> SamplerCreated:
        r = rt(request)
        req = samplers_svc.SamplerRequest(
            session_id=session_id,
            base_model=data.model,
            max_seq_length=data.max_seq_length,
            model_path=data.checkpoint_path,
        )
        async with r.db.transaction() as s, admission.workload(s, r.settings, r.catalog, principal.org_id):
            smp = await samplers_svc.create_sampler(s, principal, r.catalog, req)
        await r.kick_controller()
        return SamplerCreated(_sampling_server(smp, r.settings.base_url))

    async def _trainer_in_session(
        self, request: Request, principal: Principal, session_id: str, trainer_id: str
    ) -> Run:
        async with rt(request).db.session() as s:
            await sessions_svc.get_session(s, principal, session_id)
            run = await runs_svc.get_run(s, principal, trainer_id)
        if run.session_id != session_id:
            raise NotFound("trainer", trainer_id)
        return run

    @get(
        "/trainer_sessions/{session_id:str}/trainers/{trainer_id:str}/checkpoints",
        opt=OWN,
        responses=raises(InvalidInput, NotFound),
    )
    async def list_checkpoints(
        self, request: Request, principal: Principal, session_id: SessionPath, trainer_id: TrainerPath
    ) -> LegacyCheckpointList:
        run = await self._trainer_in_session(request, principal, session_id, trainer_id)
        async with rt(request).db.session() as s:
            rows = await ckpt_svc.list_checkpoints(
                s, principal, run_id=run.id, base_model=None, checkpoint_path=None, scope="org"
            )
        return LegacyCheckpointList(trainer_id=run.id, checkpoints=[p.legacy_checkpoint_json(c) for c in rows])

    @get(
        "/trainer_sessions/{session_id:str}/trainers/{trainer_id:str}/checkpoints/{checkpoint_id:str}/files",
        opt=ORG,
        responses=raises(InvalidInput, NotFound),
    )
    async def checkpoint_files(
        self,
        request: Request,
        principal: Principal,
        session_id: SessionPath,
        trainer_id: TrainerPath,
        checkpoint_id: CheckpointIdPath,
        page_size: PageSize = 1000,
        page_token: PageToken = 0,
    ) -> CheckpointFiles:
        run = await self._trainer_in_session(request, principal, session_id, trainer_id)
        r = rt(request)
        async with r.db.session() as s:
            ckpt = await ckpt_svc.get_checkpoint(s, principal, checkpoint_id)
            if ckpt.run_id != run.id:
                raise NotFound("checkpoint", checkpoint_id)
            page = await ckpt_svc.checkpoint_files(
                s, ckpt, page_size=page_size, page_token=page_token, url_for=r.download_url
            )
        return files_page(page)

    @post("/trainers/search", opt=OWN, status_code=200, responses=raises(InvalidInput, PayloadTooLarge))
    async def search_trainers(self, request: Request, principal: Principal, data: TrainerSearchBody) -> TrainerSearch:
        async with rt(request).db.session() as s:
            rows = await runs_svc.list_runs(s, principal, run_id=data.trainer_id, scope="org")
        return TrainerSearch(
            [TrainerRef(trainer_id=x.id, session_id=x.session_id, base_model=x.base_model) for x in rows]
        )

    @post("/trainers/checkpoints/search", opt=OWN, status_code=200, responses=raises(InvalidInput, PayloadTooLarge))
    async def search_checkpoint(
        self, request: Request, principal: Principal, data: CheckpointSearchBody
    ) -> CheckpointFound:
        async with rt(request).db.session() as s:
            rows = await ckpt_svc.list_checkpoints(
                s, principal, run_id=None, base_model=None, checkpoint_path=data.checkpoint_path, scope="org"
            )
        if not rows:
            raise InvalidInput(f"checkpoint {data.checkpoint_path!r} not found", field="checkpoint_path")
        return CheckpointFound(p.legacy_checkpoint_json(rows[0]))
