"""Tinker REST reads: training runs, checkpoints, weights info; checkpoint delete, TTL,
publish / unpublish and download URLs.

The checkpoint routes take ``{kind}/{name}`` then an optional action segment
(``/ttl``, ``/publish``, ``/external_weights_urls``) in one path parameter: the SDK does not
encode the slash of a checkpoint id, so Litestar cannot route on the action."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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
    ExternalWeightsUrls,
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
CheckpointActionPath = Annotated[
    str,
    Parameter(pattern=NO_NUL, description="{kind}/{name}/{action} of the checkpoint (publish, external_weights_urls)"),
]


def _action(request: Request, checkpoint_id: str, *actions: str | None) -> tuple[str, str | None]:
    """``{kind}/{name}[/{action}]`` split in two; a 404 (no such route) for any other action."""
    parts = checkpoint_id.strip("/").split("/")
    cid, action = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    if len(parts) > 3 or action not in actions:
        raise NotFound("route", f"{request.method} {request.url.path}")
    return cid, action


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
    ) -> CheckpointDeleted | Checkpoint:
        """``DELETE .../checkpoints/{kind}/{name}`` deletes the checkpoint and its files;
        ``DELETE .../checkpoints/{kind}/{name}/publish`` unpublishes it (answers the checkpoint)."""
        cid, action = _action(request, checkpoint_id, None, "publish")
        if action == "publish":
            return await self._set_public(request, principal, run_id, cid, public=False)
        r = rt(request)
        async with r.db.transaction() as s:
            ckpt = await tr_svc.find_run_checkpoint(s, principal, run_id, cid)
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
        cid, _ = _action(request, checkpoint_id, "ttl")
        async with rt(request).db.transaction() as s:
            ckpt = await tr_svc.find_run_checkpoint(s, principal, run_id, cid)
            tr_svc.set_ttl(ckpt, data.ttl_seconds, MAX_TTL_SECONDS)
            return p.checkpoint_json(ckpt)

    @post(
        "/training_runs/{run_id:str}/checkpoints/{checkpoint_id:path}",
        opt=OWN,
        status_code=200,
        responses=raises(InvalidInput, NotFound),
    )
    async def publish_checkpoint(
        self, request: Request, principal: Principal, run_id: RunPath, checkpoint_id: CheckpointActionPath
    ) -> Checkpoint:
        """``POST .../checkpoints/{kind}/{name}/publish``: other orgs may then start from it by
        its path (load_weights, ``create_training_client_from_state``, ``base_checkpoint``).
        Publishing a public checkpoint changes nothing."""
        cid, _ = _action(request, checkpoint_id, "publish")
        return await self._set_public(request, principal, run_id, cid, public=True)

    async def _set_public(
        self, request: Request, principal: Principal, run_id: str, cid: str, *, public: bool
    ) -> Checkpoint:
        async with rt(request).db.transaction() as s:
            ckpt = await tr_svc.find_run_checkpoint(s, principal, run_id, cid)
            ckpt.public = public
            return p.checkpoint_json(ckpt)

    @get(
        "/training_runs/{run_id:str}/checkpoints/{checkpoint_id:path}",
        opt=OWN,
        responses=raises(InvalidInput, NotFound),
    )
    async def external_weights_urls(
        self, request: Request, principal: Principal, run_id: RunPath, checkpoint_id: CheckpointActionPath
    ) -> ExternalWeightsUrls:
        """``GET .../checkpoints/{kind}/{name}/external_weights_urls``: a signed, expiring
        download URL per file (S3 presigned, or this server's ``/v1/downloads``). The SDK asks
        for ``external_weights`` checkpoints; openloops answers for every kind of the org's."""
        cid, _ = _action(request, checkpoint_id, "external_weights_urls")
        r = rt(request)
        expires = datetime.now(UTC) + timedelta(seconds=r.settings.download_url_ttl_seconds)
        async with r.db.session() as s:
            ckpt = await tr_svc.find_run_checkpoint(s, principal, run_id, cid)
            urls = await tr_svc.file_urls(s, ckpt, r.download_url)
        return ExternalWeightsUrls(urls=urls, expires=expires.isoformat())

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
