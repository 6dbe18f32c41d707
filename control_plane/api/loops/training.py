"""/v1/loops sessions, runs, trainers and samplers."""

from __future__ import annotations

from typing import Annotated, Literal

from litestar import Controller, Request, get, post
from litestar.di import Provide
from litestar.params import Parameter
from litestar.serialization import encode_json

from control_plane.api.auth import provide_principal
from control_plane.api.encoded import EncodedJSON
from control_plane.api.fields import path_id, query_text
from control_plane.api.loops import presenters as p
from control_plane.api.loops.responses import (
    Deactivated,
    LoopsSession,
    RunEnvelope,
    RunList,
    SamplerEnvelope,
    SamplerList,
    SessionCreated,
    SessionEnvelope,
    SessionRef,
)
from control_plane.api.loops.schemas import CreateRunBody, CreateSamplerBody, CreateSessionBody
from control_plane.api.openapi import OptionalBodyOperation, raises
from control_plane.api.request import CONTROL_BODY
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import InvalidInput, NotFound, PayloadTooLarge
from control_plane.fields import column_length
from control_plane.services import admission, hot_reads
from control_plane.services import runs as runs_svc
from control_plane.services import samplers as samplers_svc
from control_plane.services import sessions as sessions_svc
from control_plane.statuses import Scope
from control_plane.training.initial_op import enqueue_initial_op
from control_plane.training.queue import TrainerQueue

ORG = {"scope": Scope.MANAGE_ORG_TRAINING_PROJECTS}
OWN = {"scope": Scope.MANAGE_OWN}
ORG_CREATE = {**ORG, **CONTROL_BODY}  # a route that creates: its body is small

SessionPath = Annotated[str, path_id(m.Session.id)]
RunPath = Annotated[str, path_id(m.Run.id)]
SamplerPath = Annotated[str, path_id(m.Sampler.id)]
DeploymentPath = Annotated[str, path_id(m.Deployment.id)]
CheckpointIdPath = Annotated[str, path_id(m.Checkpoint.id)]
# the ``scope`` of a list: the caller's own rows (own) or the whole org's (org)
ListScope = Annotated[Literal["own", "org"] | None, Parameter(query="scope")]


class LoopsTrainingController(Controller):
    path = "/v1/loops"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @post(
        "/sessions",
        opt=ORG_CREATE,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge),
        operation_class=OptionalBodyOperation,
    )
    async def create_session(
        self, request: Request, principal: Principal, data: CreateSessionBody | None = None
    ) -> SessionCreated:
        r = rt(request)
        async with r.db.transaction() as s:
            await admission.session(s, r.settings, principal.org_id)
            row = await sessions_svc.create_session(
                s, principal, origin="loops", training_project_id=data.training_project_id if data else None
            )
        return SessionCreated(SessionRef(row.id))

    @get("/sessions/{session_id:str}", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def get_session(self, request: Request, principal: Principal, session_id: SessionPath) -> SessionEnvelope:
        async with rt(request).db.session() as s:
            row = await sessions_svc.get_session(s, principal, session_id)
        return SessionEnvelope(LoopsSession(id=row.id, status=row.status, created_at=row.created_at))

    async def _create_run(
        self, request: Request, principal: Principal, data: CreateRunBody, with_sampler: bool
    ) -> RunEnvelope:
        r = rt(request)
        req = runs_svc.RunRequest(
            session_id=data.session_id,
            base_model=data.base_model,
            name=data.name,
            max_seq_len=data.max_seq_len,
            lora_rank=data.lora_rank,
            seed=data.seed,
            scale_down_delay_seconds=data.scale_down_delay_seconds,
            availability_model=data.availability_model,
            replicas=data.replicas,
            path=data.path,
            base_checkpoint=data.base_checkpoint,
            reuse_from_run_id=data.reuse_from_run_id,
            reuse_from_session_id=data.reuse_from_session_id,
            with_sampler=with_sampler,
            activation_checkpointing=data.activation_checkpointing,
        )
        async with r.db.transaction() as s:
            async with admission.run(s, r.settings, r.catalog, principal.org_id):
                created = await runs_svc.create_run(
                    s,
                    principal,
                    r.catalog,
                    req,
                    r.settings.default_scale_down_delay_seconds,
                    max_replicas=r.settings.run_max_replicas,
                )
            await enqueue_initial_op(r, s, created.run)
            users = await p.principal_names(s, {created.run.created_by})
        for rid in created.replaced_run_ids:
            await TrainerQueue(r.redis).end_run(rid, f"run {rid} was replaced by run {created.run.id}")
        await r.kick_controller()
        return RunEnvelope(p.run_json(created.run, created.sampler, r.settings.base_url, users))

    @post("/runs", opt=ORG_CREATE, status_code=200, responses=raises(InvalidInput, PayloadTooLarge, NotFound))
    async def create_run(self, request: Request, principal: Principal, data: CreateRunBody) -> RunEnvelope:
        return await self._create_run(request, principal, data, with_sampler=True)

    @post("/trainers", opt=ORG_CREATE, status_code=200, responses=raises(InvalidInput, PayloadTooLarge, NotFound))
    async def create_trainer(self, request: Request, principal: Principal, data: CreateRunBody) -> RunEnvelope:
        return await self._create_run(request, principal, data, with_sampler=False)

    @get("/runs", opt=OWN, responses=raises(InvalidInput))
    async def list_runs(
        self,
        request: Request,
        principal: Principal,
        run_id: Annotated[str | None, query_text(max_length=column_length(m.Run.id))] = None,
        base_model: Annotated[str | None, query_text(max_length=column_length(m.Run.base_model))] = None,
        visibility: ListScope = None,
    ) -> RunList:
        r = rt(request)
        async with r.db.session() as s:
            rows = await runs_svc.list_runs(s, principal, run_id=run_id, base_model=base_model, scope=visibility)
            samplers = await runs_svc.samplers_by_run(s, [x.id for x in rows])
            users = await p.principal_names(s, {x.created_by for x in rows})
        return RunList([p.run_json(x, samplers.get(x.id), r.settings.base_url, users) for x in rows])

    @get("/runs/{run_id:str}", opt=ORG, responses=raises(InvalidInput, NotFound, ok=RunEnvelope))
    async def get_run(self, request: Request, principal: Principal, run_id: RunPath) -> EncodedJSON:
        """The hot read: answered from the process's read cache as already-encoded JSON."""
        r = rt(request)
        base = r.settings.base_url
        body = await hot_reads.get_run(
            r.db, principal, run_id, lambda view: encode_json(RunEnvelope(p.run_view_json(view, base))), ("json", base)
        )
        return EncodedJSON(body)

    @post("/runs/{run_id:str}/deactivate", opt=ORG, status_code=200, responses=raises(InvalidInput, NotFound))
    async def deactivate_run(self, request: Request, principal: Principal, run_id: RunPath) -> Deactivated:
        r = rt(request)
        async with r.db.transaction() as s:
            run = await runs_svc.deactivate_run(s, principal, run_id)
            users = await p.principal_names(s, {run.created_by})
        await r.kick_controller()
        return p.deactivated_json(run.id, run.base_model, users, run.created_by)

    @post("/samplers", opt=ORG_CREATE, status_code=200, responses=raises(InvalidInput, PayloadTooLarge, NotFound))
    async def create_sampler(self, request: Request, principal: Principal, data: CreateSamplerBody) -> SamplerEnvelope:
        r = rt(request)
        req = samplers_svc.SamplerRequest(
            session_id=data.session_id,
            base_model=data.base_model,
            run_id=data.run_id,
            max_seq_length=data.max_seq_length,
            model_path=data.model_path,
        )
        async with r.db.transaction() as s:
            async with admission.workload(s, r.settings, r.catalog, principal.org_id):
                smp = await samplers_svc.create_sampler(s, principal, r.catalog, req)
            users = await p.principal_names(s, {smp.created_by})
        await r.kick_controller()
        return SamplerEnvelope(p.sampler_json(smp, r.settings.base_url, users))

    @get("/samplers", opt=OWN, responses=raises(InvalidInput))
    async def list_samplers(self, request: Request, principal: Principal, visibility: ListScope = None) -> SamplerList:
        r = rt(request)
        async with r.db.session() as s:
            rows = await samplers_svc.list_samplers(s, principal, scope=visibility)
            users = await p.principal_names(s, {x.created_by for x in rows})
        return SamplerList([p.sampler_json(x, r.settings.base_url, users) for x in rows])

    @get("/samplers/{sampler_id:str}", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def get_sampler(self, request: Request, principal: Principal, sampler_id: SamplerPath) -> SamplerEnvelope:
        r = rt(request)
        async with r.db.session() as s:
            smp = await samplers_svc.get_sampler(s, principal, sampler_id)
            users = await p.principal_names(s, {smp.created_by})
        return SamplerEnvelope(p.sampler_json(smp, r.settings.base_url, users))

    @post("/samplers/{sampler_id:str}/deactivate", opt=ORG, status_code=200, responses=raises(InvalidInput, NotFound))
    async def deactivate_sampler(self, request: Request, principal: Principal, sampler_id: SamplerPath) -> Deactivated:
        r = rt(request)
        async with r.db.transaction() as s:
            smp = await samplers_svc.deactivate_sampler(s, principal, sampler_id)
            users = await p.principal_names(s, {smp.created_by})
        await r.kick_controller()
        return p.deactivated_json(smp.id, smp.base_model, users, smp.created_by)
