"""/v1/loops checkpoints and capabilities."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import Provide
from litestar.serialization import encode_json

from control_plane.api.auth import provide_principal
from control_plane.api.encoded import EncodedJSON
from control_plane.api.fields import query_int, query_text
from control_plane.api.loops import presenters as p
from control_plane.api.loops.responses import (
    Capabilities,
    CheckpointFile,
    CheckpointFiles,
    CheckpointList,
    CheckpointSource,
    CheckpointValid,
    LoopsModel,
    Source,
)
from control_plane.api.loops.schemas import ValidateCheckpointBody
from control_plane.api.loops.training import ORG, OWN, CheckpointIdPath, ListScope
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import InvalidInput, NotFound, PayloadTooLarge
from control_plane.fields import INT32_MAX, column_length
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import hot_reads


def _checkpoints_body(rows: Iterable[Any]) -> bytes:
    return encode_json(CheckpointList([p.checkpoint_json(c) for c in rows]))


PageSize = Annotated[int, query_int(ge=1, le=ckpt_svc.MAX_PAGE_SIZE)]
PageToken = Annotated[int, query_int(ge=0, le=INT32_MAX, description="the offset of the page's first file")]


def files_page(page: ckpt_svc.FilePage) -> CheckpointFiles:
    return CheckpointFiles(
        presigned_urls=[CheckpointFile(**f) for f in page.files],
        total_count=page.total_count,
        next_page_token=page.next_page_token,
    )


class LoopsResourcesController(Controller):
    path = "/v1/loops"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @get("/checkpoints", opt=OWN, responses=raises(InvalidInput, ok=CheckpointList))
    async def list_checkpoints(
        self,
        request: Request,
        principal: Principal,
        run_id: Annotated[str | None, query_text(max_length=column_length(m.Run.id))] = None,
        base_model: Annotated[str | None, query_text(max_length=column_length(m.Checkpoint.base_model))] = None,
        checkpoint_path: Annotated[str | None, query_text()] = None,
        visibility: ListScope = None,
    ) -> EncodedJSON:
        """``run_id`` alone is the hot read (answered from the read cache, already encoded)."""
        if run_id and not base_model and not checkpoint_path:  # what training loops poll
            body = await hot_reads.run_checkpoints(
                rt(request).db, principal, run_id, visibility, _checkpoints_body, "json"
            )
            return EncodedJSON(body)
        async with rt(request).db.session() as s:
            rows = await ckpt_svc.list_checkpoints(
                s, principal, run_id=run_id, base_model=base_model, checkpoint_path=checkpoint_path, scope=visibility
            )
        return EncodedJSON(_checkpoints_body(rows))

    @post("/checkpoints/validate", opt=OWN, status_code=200, responses=raises(InvalidInput, PayloadTooLarge))
    async def validate_checkpoint(
        self, request: Request, principal: Principal, data: ValidateCheckpointBody
    ) -> CheckpointValid:
        async with rt(request).db.session() as s:
            await ckpt_svc.validate_checkpoint(s, principal, data.checkpoint_path)
        return CheckpointValid()

    @get("/checkpoints/{checkpoint_id:str}/files", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def checkpoint_files(
        self,
        request: Request,
        principal: Principal,
        checkpoint_id: CheckpointIdPath,
        page_size: PageSize = 1000,
        page_token: PageToken = 0,
    ) -> CheckpointFiles:
        r = rt(request)
        async with r.db.session() as s:
            ckpt = await ckpt_svc.get_checkpoint(s, principal, checkpoint_id)
            page = await ckpt_svc.checkpoint_files(
                s, ckpt, page_size=page_size, page_token=page_token, url_for=r.download_url
            )
        return files_page(page)

    @get("/checkpoints/{checkpoint_id:str}/source", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def checkpoint_source(
        self, request: Request, principal: Principal, checkpoint_id: CheckpointIdPath
    ) -> CheckpointSource:
        """Where a checkpoint's files come from: always the files route (presigned URLs)."""
        async with rt(request).db.session() as s:
            await ckpt_svc.get_checkpoint(s, principal, checkpoint_id)
        return CheckpointSource(Source(kind="s3"))

    @get("/capabilities", opt=OWN, responses=raises())
    async def capabilities(self, request: Request, principal: Principal) -> Capabilities:
        return Capabilities(
            [
                LoopsModel(
                    model_name=x.name,
                    max_context_length=x.max_context_length,
                    supports_vision_language=x.supports_vision_language,
                    trainable=x.trainable,
                    sampleable=x.sampleable,
                )
                for x in rt(request).catalog.models
            ]
        )
