"""/v1/loops checkpoints and capabilities."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import Provide
from litestar.params import Parameter
from litestar.serialization import encode_json

from control_plane.api.auth import provide_principal
from control_plane.api.encoded import EncodedJSON
from control_plane.api.loops import presenters as p
from control_plane.api.loops.schemas import ValidateCheckpointBody
from control_plane.api.loops.training import ORG, OWN
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import hot_reads


def _checkpoints_body(rows: Iterable[Any]) -> bytes:
    return encode_json({"checkpoints": [p.checkpoint_json(c) for c in rows]})


class LoopsResourcesController(Controller):
    path = "/v1/loops"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @get("/checkpoints", opt=OWN)
    async def list_checkpoints(
        self,
        request: Request,
        principal: Principal,
        run_id: str | None = None,
        base_model: str | None = None,
        checkpoint_path: str | None = None,
        visibility: str | None = Parameter(query="scope", default=None),
    ) -> EncodedJSON:
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

    @post("/checkpoints/validate", opt=OWN, status_code=200)
    async def validate_checkpoint(
        self, request: Request, principal: Principal, data: ValidateCheckpointBody
    ) -> dict[str, Any]:
        async with rt(request).db.session() as s:
            await ckpt_svc.validate_checkpoint(s, principal, data.checkpoint_path)
        return {}

    @get("/checkpoints/{checkpoint_id:str}/files", opt=ORG)
    async def checkpoint_files(
        self, request: Request, principal: Principal, checkpoint_id: str, page_size: int = 1000, page_token: int = 0
    ) -> dict[str, Any]:
        r = rt(request)
        async with r.db.session() as s:
            ckpt = await ckpt_svc.get_checkpoint(s, principal, checkpoint_id)
            page = await ckpt_svc.checkpoint_files(
                s, ckpt, page_size=page_size, page_token=page_token, url_for=r.download_url
            )
        return {"presigned_urls": page.files, "total_count": page.total_count, "next_page_token": page.next_page_token}

    @get("/checkpoints/{checkpoint_id:str}/source", opt=ORG)
    async def checkpoint_source(self, request: Request, principal: Principal, checkpoint_id: str) -> dict[str, Any]:
        """Where a checkpoint's files come from: always the files route (presigned URLs)."""
        async with rt(request).db.session() as s:
            await ckpt_svc.get_checkpoint(s, principal, checkpoint_id)
        return {"source": {"kind": "s3"}}

    @get("/capabilities", opt=OWN)
    async def capabilities(self, request: Request, principal: Principal) -> dict[str, Any]:
        return {
            "supported_models": [
                {
                    "model_name": m.name,
                    "max_context_length": m.max_context_length,
                    "supports_vision_language": m.supports_vision_language,
                    "trainable": m.trainable,
                    "sampleable": m.sampleable,
                }
                for m in rt(request).catalog.models
            ]
        }
