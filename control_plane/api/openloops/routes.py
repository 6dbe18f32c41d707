"""``/v1/openloops``: who a key is, the org's API keys, runs with their activity and history."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, get, post
from litestar.di import Provide
from litestar.params import Parameter

from control_plane.api.auth import provide_principal
from control_plane.api.fields import path_id, query_text
from control_plane.api.loops import presenters as p
from control_plane.api.openapi import OptionalBodyOperation, raises
from control_plane.api.openloops.responses import (
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyOut,
    RunActivity,
    RunActivityList,
    RunHistory,
    StatusChange,
    WhoAmI,
)
from control_plane.api.openloops.schemas import CreateApiKeyBody
from control_plane.api.request import CONTROL_BODY
from control_plane.api.state import rt
from control_plane.auth.authenticator import invalidate_key
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import Forbidden, InvalidInput, NotFound, PayloadTooLarge
from control_plane.fields import column_length
from control_plane.services import identity, org_keys, run_activity
from control_plane.statuses import Scope

ORG = {"scope": Scope.MANAGE_ORG_TRAINING_PROJECTS}
KEYS = {"scope": Scope.MANAGE_ORG_API_KEYS}

RunPath = Annotated[str, path_id(m.Run.id)]
KeyPath = Annotated[str, path_id(m.ApiKey.id)]


def _key_json(k: m.ApiKey, owner: str) -> ApiKeyOut:
    return ApiKeyOut(
        id=k.id,
        name=k.name,
        prefix=k.display_prefix,
        owner=owner,
        scopes=sorted(k.scopes),
        created_at=k.created_at,
        last_used_at=k.last_used_at,
        revoked_at=k.revoked_at,
    )


class OpenloopsController(Controller):
    path = "/v1/openloops"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["openloops"]

    @get("/whoami", responses=raises())
    async def whoami(self, request: Request, principal: Principal) -> WhoAmI:
        """The caller: its org, user or service account, and the scopes of its key."""
        async with rt(request).db.session() as s:
            org = await identity.get_org(s, principal.org_id)
            names = await p.principal_names(s, {principal.principal_id})
        creator = names.get(principal.principal_id)
        name = (
            (creator.service_account or creator.email or principal.principal_id) if creator else principal.principal_id
        )
        return WhoAmI(
            org_id=org.id,
            org_name=org.name,
            principal_id=principal.principal_id,
            principal_name=name or principal.principal_id,
            key_id=principal.key_id,
            scopes=sorted(principal.scopes),
        )

    @get("/api_keys", opt=KEYS, responses=raises(InvalidInput, Forbidden))
    async def list_keys(self, request: Request, principal: Principal, include_revoked: bool = False) -> ApiKeyList:
        async with rt(request).db.session() as s:
            rows = await org_keys.list_keys(s, principal, include_revoked)
        return ApiKeyList([_key_json(k, owner) for k, owner in rows])

    @post(
        "/api_keys",
        opt={**KEYS, **CONTROL_BODY},
        status_code=201,
        responses=raises(InvalidInput, Forbidden, PayloadTooLarge),
        operation_class=OptionalBodyOperation,
    )
    async def create_key(
        self, request: Request, principal: Principal, data: CreateApiKeyBody | None = None
    ) -> ApiKeyCreated:
        """A new key of the caller's own user or service account; its secret is in this answer
        only."""
        body = data or CreateApiKeyBody()
        async with rt(request).db.transaction() as s:
            created, owner = await org_keys.create_key(s, principal, body.name, body.scopes)
        return ApiKeyCreated(key=_key_json(created.row, owner), api_key=created.plaintext)

    @post("/api_keys/{key_id:str}/revoke", opt=KEYS, status_code=200, responses=raises(InvalidInput, NotFound))
    async def revoke_key(self, request: Request, principal: Principal, key_id: KeyPath) -> ApiKeyOut:
        """Revoke a key of the org (at once here and in Redis; other API replicas follow within
        ``key_local_cache_seconds``)."""
        r = rt(request)
        async with r.db.transaction() as s:
            key, owner = await org_keys.revoke_key(s, principal, key_id)
        await invalidate_key(r.redis, key.key_hash)
        r.authenticator.forget(key.key_hash)
        return _key_json(key, owner)

    @get("/runs", opt=ORG, responses=raises(InvalidInput))
    async def list_runs(
        self,
        request: Request,
        principal: Principal,
        status: Annotated[str | None, query_text(max_length=32)] = None,
        base_model: Annotated[str | None, query_text(max_length=column_length(m.Run.base_model))] = None,
        limit: Annotated[int, Parameter(ge=1, le=run_activity.MAX_LIMIT)] = 100,
        cursor: Annotated[str | None, query_text(max_length=400)] = None,
    ) -> RunActivityList:
        """The org's runs, newest first, with their last request time (``limit`` per page)."""
        async with rt(request).db.session() as s:
            rows, nxt = await run_activity.list_runs(
                s, principal, status=status, base_model=base_model, limit=limit, cursor=cursor
            )
            users = await p.principal_names(s, {x.created_by for x in rows})
        out = []
        for x in rows:
            creator = users.get(x.created_by)
            who = (creator.email or creator.service_account) if creator else None
            out.append(
                RunActivity(
                    id=x.id,
                    name=x.name,
                    origin=x.origin,
                    base_model=x.base_model,
                    status=x.status,
                    status_reason=x.status_reason,
                    created_by=who or x.created_by,
                    created_at=x.created_at,
                    last_request_at=x.last_request_at,
                    policy_version=x.policy_version,
                    deployment_id=x.deployment_id,
                )
            )
        return RunActivityList(out, nxt)

    @get("/runs/{run_id:str}/status_history", opt=ORG, responses=raises(InvalidInput, NotFound))
    async def run_history(self, request: Request, principal: Principal, run_id: RunPath) -> RunHistory:
        async with rt(request).db.session() as s:
            rows = await run_activity.history(s, principal, run_id)
        return RunHistory(
            run_id=run_id,
            changes=[
                StatusChange(
                    resource_type=h.resource_type,
                    resource_id=h.resource_id,
                    from_status=h.from_status,
                    to_status=h.to_status,
                    reason=h.reason,
                    at=h.created_at,
                )
                for h in rows
            ],
        )
