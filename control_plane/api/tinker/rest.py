"""Tinker REST reads: training runs, checkpoints, weights info; checkpoint delete and TTL."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, delete, get, post, put
from litestar.di import Provide
from litestar.params import Parameter

from control_plane.api.auth import provide_principal
from control_plane.api.fields import path_id, query_text
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.api.tinker import presenters as p
from control_plane.api.tinker.bootstrap import OWN, AccessScope, Limit, Offset, access_scope, page
from control_plane.api.tinker.responses import (
    Checkpoint,
    CheckpointDeleted,
    CheckpointList,
    CheckpointPage,
    Cursor,
    TrainingRun,
    TrainingRunList,
    WeightsInfo,
)
from control_plane.api.tinker.schemas import CheckpointTtlBody, WeightsInfoBody
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from control_plane.fields import NO_NUL, column_length
from control_plane.sampling.dispatcher import dispatcher_for
from control_plane.services import runs as runs_svc
from control_plane.services import training_runs as tr_svc
from control_plane.training.ops import MAX_TTL_SECONDS

RunPath = Annotated[str, path_id(m.Run.id)]
# ``{kind}/{name}``: holds a slash, which an OpenAPI path parameter cannot say (so no pattern)
CheckpointIdPath = Annotated[str, Parameter(pattern=NO_NUL, description="{kind}/{name} of the checkpoint")]
CheckpointTtlPath = Annotated[str, Parameter(pattern=NO_NUL, description="{kind}/{name}/ttl of the checkpoint")]


class TinkerRestController(Controller):
    path = "/api/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["tinker"]

    @post("/weights_info", opt=OWN, status_code=200, responses=raises(InvalidInput, PayloadTooLarge, NotFound))
    async def weights_info(self, request: Request, principal: Principal, data: WeightsInfoBody) -> WeightsInfo:
        async with rt(request).db.session() as s:
            ckpt = await tr_svc.checkpoint_by_path(s, principal, data.tinker_path)
        return p.weights_info_json(ckpt)

    @get("/training_runs", opt=OWN, responses=raises(InvalidInput))
    async def list_runs(
        self,
        request: Request,
        principal: Principal,
        limit: Limit = 20,
        offset: Offset = 0,
        scope_: AccessScope = None,
        project_id: Annotated[str | None, query_text(max_length=column_length(m.TrainingProject.id))] = None,
    ) -> TrainingRunList:
        limit, offset = page(limit, offset)
        async with rt(request).db.session() as s:
            res = await tr_svc.list_training_runs(
                s, principal, limit=limit, offset=offset, scope=access_scope(scope_), project_id=project_id
            )
        return TrainingRunList(
            training_runs=[p.training_run_json(*row) for row in res.runs],
            cursor=Cursor(offset=offset, limit=limit, total_count=res.total),
        )

    @get("/training_runs/{run_id:str}", opt=OWN, responses=raises(InvalidInput, NotFound))
    async def get_run(
        self, request: Request, principal: Principal, run_id: RunPath, scope_: AccessScope = None
    ) -> TrainingRun:
        access_scope(scope_)
        async with rt(request).db.session() as s:
            run = await runs_svc.get_run(s, principal, run_id)
            [row] = await tr_svc.with_last_checkpoints(s, [run])
            return p.training_run_json(*row)

    @get("/training_runs/{run_id:str}/checkpoints", opt=OWN, responses=raises(InvalidInput, NotFound))
    async def run_checkpoints(self, request: Request, principal: Principal, run_id: RunPath) -> CheckpointList:
        async with rt(request).db.session() as s:
            rows = await tr_svc.list_run_checkpoints(s, principal, run_id)
        return CheckpointList([p.checkpoint_json(c) for c in rows])

    @delete(
        "/training_runs/{run_id:str}/checkpoints/{checkpoint_id:path}",
        opt=OWN,
        status_code=200,
        responses=raises(InvalidInput, NotFound, Conflict),
    )
    async def delete_checkpoint(
        self, request: Request, principal: Principal, run_id: RunPath, checkpoint_id: CheckpointIdPath
    ) -> CheckpointDeleted:
        r = rt(request)
        async with r.db.transaction() as s:
            ckpt = await tr_svc.find_run_checkpoint(s, principal, run_id, checkpoint_id.lstrip("/"))
            tinker_path = p.checkpoint_json(ckpt).tinker_path
            base_model = ckpt.base_model
            prefix = await tr_svc.delete_checkpoint_row(s, ckpt)
        removed = await tr_svc.delete_checkpoint_files(r.store, prefix)
        # best effort: the base model's vLLM drops the adapter so it stops holding a LoRA slot
        await dispatcher_for(r).unload_deleted_adapter(base_model, prefix)
        return CheckpointDeleted(deleted=tinker_path, files_removed=removed)

    @put(
        "/training_runs/{run_id:str}/checkpoints/{checkpoint_id:path}",
        opt=OWN,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, NotFound),
    )
    async def set_checkpoint_ttl(
        self,
        request: Request,
        principal: Principal,
        run_id: RunPath,
        checkpoint_id: CheckpointTtlPath,
        data: CheckpointTtlBody,
    ) -> Checkpoint:
        """``PUT .../checkpoints/{kind}/{name}/ttl``."""
        cid = checkpoint_id.lstrip("/")
        if not cid.endswith("/ttl"):
            raise NotFound("route", f"PUT {request.url.path}")
        async with rt(request).db.transaction() as s:
            ckpt = await tr_svc.find_run_checkpoint(s, principal, run_id, cid[: -len("/ttl")])
            tr_svc.set_ttl(ckpt, data.ttl_seconds, MAX_TTL_SECONDS)
            return p.checkpoint_json(ckpt)

    @get("/checkpoints", opt=OWN, responses=raises(InvalidInput))
    async def all_checkpoints(
        self,
        request: Request,
        principal: Principal,
        limit: Limit = 100,
        offset: Offset = 0,
        scope_: AccessScope = None,
    ) -> CheckpointPage:
        limit, offset = page(limit, offset)
        async with rt(request).db.session() as s:
            rows, total = await tr_svc.list_all_checkpoints(
                s, principal, limit=limit, offset=offset, scope=access_scope(scope_)
            )
        return CheckpointPage(
            checkpoints=[p.checkpoint_json(c) for c in rows],
            cursor=Cursor(offset=offset, limit=limit, total_count=total),
        )
