"""Reads the API key from the three accepted headers and enforces the route's scope."""

from __future__ import annotations

from litestar import Request

from control_plane.auth.principal import Principal
from control_plane.statuses import Scope


def presented_key(request: Request) -> str | None:
    headers = request.headers
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() in ("bearer", "api-key") and value.strip():
            return value.strip()
        return None
    return headers.get("x-api-key") or None


async def provide_principal(request: Request) -> Principal:
    runtime = request.app.state.runtime
    principal = await runtime.authenticator.authenticate(presented_key(request))
    scope: Scope | None = request.route_handler.opt.get("scope")
    if scope is not None:
        principal.require(scope)
    request.scope.setdefault("state", {})["principal_id"] = principal.principal_id
    return principal
