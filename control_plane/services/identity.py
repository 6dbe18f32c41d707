"""Orgs, users, service accounts and API keys (admin CLI and local-mode bootstrap)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.keys import display_prefix, generate_key, hash_key
from control_plane.db.models import ApiKey, Org, ServiceAccount, User
from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.statuses import ALL_SCOPES, Scope


async def create_org(s: AsyncSession, name: str) -> Org:
    name = name.strip()
    if not name:
        raise InvalidInput("org name must not be empty", field="name")
    org = Org(id=new_id("org"), name=name)
    s.add(org)
    try:
        await s.flush()
    except IntegrityError as exc:
        raise Conflict(f"an org named {name!r} already exists") from exc
    return org


async def get_org(s: AsyncSession, ref: str) -> Org:
    """By id or by name."""
    org = (await s.execute(select(Org).where((Org.id == ref) | (Org.name == ref)))).scalars().first()
    if org is None:
        raise NotFound("org", ref)
    return org


async def list_orgs(s: AsyncSession) -> list[Org]:
    return list((await s.execute(select(Org).order_by(Org.created_at.desc(), Org.id.desc()))).scalars())


async def create_user(s: AsyncSession, org: Org, email: str, name: str | None = None) -> User:
    if "@" not in email:
        raise InvalidInput(f"invalid email {email!r}", field="email")
    user = User(id=new_id("usr"), org_id=org.id, email=email, name=name)
    s.add(user)
    try:
        await s.flush()
    except IntegrityError as exc:
        raise Conflict(f"user {email!r} already exists in org {org.name!r}") from exc
    return user


async def create_service_account(s: AsyncSession, org: Org, name: str) -> ServiceAccount:
    if not name.strip():
        raise InvalidInput("service account name must not be empty", field="name")
    sa = ServiceAccount(id=new_id("sa"), org_id=org.id, name=name)
    s.add(sa)
    try:
        await s.flush()
    except IntegrityError as exc:
        raise Conflict(f"service account {name!r} already exists in org {org.name!r}") from exc
    return sa


async def find_owner(s: AsyncSession, org: Org, ref: str) -> User | ServiceAccount:
    """A user (by id or email) or service account (by id or name) of ``org``."""
    user = (
        (await s.execute(select(User).where(User.org_id == org.id, (User.id == ref) | (User.email == ref))))
        .scalars()
        .first()
    )
    if user is not None:
        return user
    sa = (
        (
            await s.execute(
                select(ServiceAccount).where(
                    ServiceAccount.org_id == org.id,
                    (ServiceAccount.id == ref) | (ServiceAccount.name == ref),
                )
            )
        )
        .scalars()
        .first()
    )
    if sa is None:
        raise NotFound("user or service account", ref)
    return sa


@dataclass(frozen=True)
class CreatedKey:
    row: ApiKey
    plaintext: str  # shown once, never stored


def parse_scopes(scopes: list[str] | None) -> list[str]:
    if not scopes:
        return [s.value for s in ALL_SCOPES]
    valid = {s.value for s in Scope}
    bad = [x for x in scopes if x not in valid]
    if bad:
        raise InvalidInput(f"unknown scope(s) {bad}; valid: {sorted(valid)}", field="scopes")
    return sorted(set(scopes))


async def create_api_key(
    s: AsyncSession,
    owner: User | ServiceAccount,
    *,
    scopes: list[str] | None = None,
    name: str | None = None,
    plaintext: str | None = None,
) -> CreatedKey:
    key = plaintext or generate_key()
    row = ApiKey(
        id=new_id("key"),
        org_id=owner.org_id,
        user_id=owner.id if isinstance(owner, User) else None,
        service_account_id=owner.id if isinstance(owner, ServiceAccount) else None,
        name=name,
        display_prefix=display_prefix(key),
        key_hash=hash_key(key),
        scopes=parse_scopes(scopes),
    )
    s.add(row)
    await s.flush()
    return CreatedKey(row, key)


async def list_api_keys(s: AsyncSession, org: Org, include_revoked: bool = False) -> list[ApiKey]:
    q = select(ApiKey).where(ApiKey.org_id == org.id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    q = q.order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    return list((await s.execute(q)).scalars())


async def get_api_key(s: AsyncSession, ref: str) -> ApiKey:
    """By id or display prefix (unique prefixes only)."""
    rows = list((await s.execute(select(ApiKey).where((ApiKey.id == ref) | (ApiKey.display_prefix == ref)))).scalars())
    if not rows:
        raise NotFound("api key", ref)
    if len(rows) > 1:
        raise Conflict(f"{ref!r} matches {len(rows)} keys; use the key id")
    return rows[0]


async def revoke_api_key(s: AsyncSession, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        await s.flush()
    return key
