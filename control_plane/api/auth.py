"""Reads the API key from the three accepted headers and enforces the route's scope."""

from __future__ import annotations

from litestar import Request

from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.statuses import Scope


def presented_key(request: Request) -> str | None:
    # straight from the ASGI header list (names are lower-case there): building Litestar's
    # Headers mapping costs more than the whole key check on a cached key
    auth = api_key = None
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            auth = value.decode("latin-1")
            break
        if name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() in ("bearer", "api-key") and token.strip():
            return token.strip()
        return None
    return api_key or None


async def provide_principal(request: Request) -> Principal:
    runtime = rt(request)
    client = request.client.host if request.client else None
    principal = await runtime.authenticator.authenticate(presented_key(request), client)
    scope: Scope | None = request.route_handler.opt.get("scope")
    if scope is not None:
        principal.require(scope)
    request.scope.setdefault("state", {})["principal_id"] = principal.principal_id
    return principal
