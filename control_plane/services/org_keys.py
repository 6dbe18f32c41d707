"""An org's API keys as a key holder with ``manage_org_api_keys`` manages them (the console's
keys page; operators use ``openloops admin keys``)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.db.models import ApiKey, ServiceAccount, User
from control_plane.errors import Forbidden, NotFound
from control_plane.services import identity
from control_plane.statuses import ALL_SCOPES


async def list_keys(s: AsyncSession, principal: Principal, include_revoked: bool) -> list[tuple[ApiKey, str]]:
    """(key, owner name) of every key of the caller's org, newest first."""
    org = await identity.get_org(s, principal.org_id)
    rows = await identity.list_api_keys(s, org, include_revoked)
    return [(k, await _owner_name(s, k)) for k in rows]


async def create_key(
    s: AsyncSession, principal: Principal, name: str | None, scopes: list[str] | None
) -> tuple[identity.CreatedKey, str]:
    """A new key of the caller's own user or service account, with at most the caller's scopes
    (by default its training scopes)."""
    wanted: list[str] = (
        identity.parse_scopes(scopes) if scopes else [str(x.value) for x in ALL_SCOPES if x.value in principal.scopes]
    )
    beyond = sorted(set(wanted) - principal.scopes)
    if beyond:
        raise Forbidden(f"a key cannot grant scopes its creator lacks: {beyond}")
    org = await identity.get_org(s, principal.org_id)
    owner = await identity.find_owner(s, org, principal.principal_id)
    created = await identity.create_api_key(s, owner, scopes=wanted, name=name)
    created.row.created_by = principal.principal_id
    await s.flush()
    return created, await _owner_name(s, created.row)


async def revoke_key(s: AsyncSession, principal: Principal, key_id: str) -> tuple[ApiKey, str]:
    key = await s.get(ApiKey, key_id)
    if key is None or key.org_id != principal.org_id:
        raise NotFound("api key", key_id)
    await identity.revoke_api_key(s, key)
    return key, await _owner_name(s, key)


async def _owner_name(s: AsyncSession, key: ApiKey) -> str:
    if key.user_id is not None:
        email = (await s.execute(select(User.email).where(User.id == key.user_id))).scalar()
        return email or key.user_id
    name = (await s.execute(select(ServiceAccount.name).where(ServiceAccount.id == key.service_account_id))).scalar()
    return name or str(key.service_account_id)
