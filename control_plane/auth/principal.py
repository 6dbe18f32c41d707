"""Who is calling: the authenticated identity every service call carries."""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.errors import Forbidden
from control_plane.statuses import Scope


@dataclass(frozen=True, slots=True)
class Principal:
    org_id: str
    principal_id: str  # user id or service account id: the "creator" of what it creates
    key_id: str | None
    scopes: frozenset[str]
    key_hash: str | None = None

    def require(self, scope: Scope) -> None:
        if scope.value not in self.scopes:
            raise Forbidden(f"this API key lacks the {scope.value!r} scope required by this route")

    @classmethod
    def admin(cls, org_id: str, principal_id: str = "admin-cli") -> Principal:
        """The operator acting through the admin CLI, with every scope in one org."""
        return cls(org_id, principal_id, None, frozenset(s.value for s in Scope))
