"""Tenant and ownership filters applied by every query."""

from __future__ import annotations

from typing import Any

from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput


def list_scope_filter(model: Any, principal: Principal, scope: str | None) -> list[Any]:
    """``manage_own_user_or_service_account`` list routes: the caller's own rows by default,
    every row of the caller's org with ``scope=org``."""
    conds = [model.org_id == principal.org_id]
    if own_only(scope):
        conds.append(model.created_by == principal.principal_id)
    return conds


def own_only(scope: str | None) -> bool:
    """Whether a list's ``scope`` parameter asks for the caller's own rows (the default)."""
    if scope is None or scope == "own":
        return True
    if scope != "org":
        raise InvalidInput(f"invalid scope {scope!r}: expected 'org' or omit it", field="scope")
    return False


def org_list_filter(model: Any, principal: Principal, scope: str | None) -> list[Any]:
    """``manage_org_training_projects`` list routes: the whole org by default, the caller's own
    rows with ``scope=own``."""
    if scope == "own":
        return list_scope_filter(model, principal, None)
    if scope not in (None, "org"):
        raise InvalidInput(f"invalid scope {scope!r}: expected 'org' or 'own'", field="scope")
    return [model.org_id == principal.org_id]
