"""Tinker sampling routes: create_sampling_session, GET samplers/{id}, asample (wire protocol 7).

``asample`` validates the request (400 before any future exists), admits it against the shared
server's in-flight bound (429 beyond it: the SDK backs off and resubmits), and answers at once
with ``{"request_id", "sample_sequence_ids"}``; the sampling itself runs in the background and
completes the future (``retrieve_future``) with the ``SampleResponse`` protobuf.
``compute_logprobs`` is an ``asample`` with ``prompt_logprobs``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput, NotFound
from control_plane.sampling.dispatcher import dispatcher_for
from control_plane.sampling.errors import InvalidSampleRequest
from control_plane.sampling.translate import parse_sample_request
from control_plane.services import checkpoints as checkpoints_svc
from control_plane.services import sessions as sessions_svc
from control_plane.services.samplers import get_sampler
from control_plane.services.sampling_sessions import open_sampling_session
from control_plane.statuses import Scope, SessionStatus
from data_plane.sampler.config import DEFAULT_MAX_LOGPROBS
from data_plane.wire.paths import PathError, parse_checkpoint_path

OWN = {"scope": Scope.MANAGE_OWN}
MAX_TOP_LOGPROBS = DEFAULT_MAX_LOGPROBS  # the sampler's --max-logprobs
MAX_SEQ_ID = 2**63 - 1


class CreateSamplingSessionBody(msgspec.Struct, kw_only=True):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class TinkerSamplingController(Controller):
    path = "/api/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["tinker"]

    @post("/create_sampling_session", opt=OWN, status_code=200)
    async def create_sampling_session(
        self, request: Request, principal: Principal, data: CreateSamplingSessionBody
    ) -> dict[str, Any]:
        r = rt(request)
        if not 0 <= data.sampling_session_seq_id <= MAX_SEQ_ID:
            raise InvalidInput(
                "sampling_session_seq_id must be a non-negative integer", field="sampling_session_seq_id"
            )
        if data.base_model is None and data.model_path is None:
            raise InvalidInput("one of base_model or model_path is required", field="base_model")
        async with r.db.transaction() as s:
            session = await sessions_svc.get_session(s, principal, data.session_id)
            if session.status != SessionStatus.ACTIVE.value:
                raise InvalidInput(f"session {session.id!r} is {session.status}", field="session_id")
            ckpt = None
            base_model = data.base_model
            if data.model_path is not None:
                try:
                    ref = parse_checkpoint_path(data.model_path)
                except PathError as exc:
                    raise InvalidInput(str(exc), field="model_path") from exc
                ckpt = await checkpoints_svc.find_by_ref(s, principal.org_id, ref)
                if ckpt is None:
                    raise NotFound("checkpoint", data.model_path)
                if base_model is not None and base_model != ckpt.base_model:
                    raise InvalidInput(
                        f"model_path {data.model_path!r} was trained on {ckpt.base_model}, not {base_model}",
                        field="base_model",
                    )
                base_model = ckpt.base_model
            assert base_model is not None
            model = r.catalog.get(base_model)
            if not model.sampleable:
                raise InvalidInput(f"base model {base_model!r} cannot be sampled", field="base_model")
            smp = await open_sampling_session(
                s,
                org_id=principal.org_id,
                created_by=principal.principal_id,
                session_id=session.id,
                seq_id=data.sampling_session_seq_id,
                base_model=model.name,
                checkpoint=ckpt,
            )
        await r.kick_controller()
        return {"sampling_session_id": smp.id, "type": "create_sampling_session"}

    @get("/samplers/{sampler_id:str}", opt=OWN)
    async def get_sampler(self, request: Request, principal: Principal, sampler_id: str) -> dict[str, Any]:
        async with rt(request).db.session() as s:
            smp = await get_sampler(s, principal, sampler_id)
        return {"sampler_id": smp.id, "base_model": smp.base_model, "model_path": smp.model_path}

    @post("/asample", opt=OWN, status_code=200)
    async def asample(self, request: Request, principal: Principal, data: dict[str, Any]) -> dict[str, Any]:
        spec = parse_sample_request(data)
        if data.get("record_stability_info"):
            raise InvalidSampleRequest(
                "record_stability_info is not supported by this server (StableReinforce is not implemented); "
                "use loss_fn='importance_sampling'"
            )
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
            if int(data.get(name) or 0) > MAX_TOP_LOGPROBS:
                raise InvalidSampleRequest(f"{name} must be <= {MAX_TOP_LOGPROBS}")
        sid = data.get("sampling_session_id")
        if not isinstance(sid, str) or not sid:
            raise InvalidSampleRequest("sampling_session_id is required (a string)")
        seq_id = data.get("seq_id", 0)
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 0 <= seq_id <= MAX_SEQ_ID:
            raise InvalidSampleRequest("seq_id must be a non-negative integer")
        d = dispatcher_for(rt(request))
        target = await d.target(principal.org_id, sid)
        if target.ended:
            raise InvalidInput(
                f"sampler {sid!r} is {target.status.value}"
                + (f" ({target.status_reason})" if target.status_reason else "")
                + "; create a new sampling client",
                field="sampling_session_id",
            )
        request_id, sequence_ids = await d.submit(target, spec)
        return {"request_id": request_id, "sample_sequence_ids": sequence_ids}


SAMPLING_HANDLERS = [TinkerSamplingController]
