"""Status transitions: the only way a run, sampler or deployment status changes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import StatusHistory
from control_plane.statuses import TERMINAL, Status


class HasStatus(Protocol):
    id: str
    org_id: str
    status: str
    status_reason: str | None
    updated_at: datetime


def transition(s: AsyncSession, resource_type: str, row: HasStatus, to: Status, reason: str | None = None) -> bool:
    """Move ``row`` to ``to`` with a history row; a no-op (False) if already there."""
    if row.status == to.value and (reason is None or reason == row.status_reason):
        return False
    s.add(
        StatusHistory(
            org_id=row.org_id,
            resource_type=resource_type,
            resource_id=row.id,
            from_status=row.status,
            to_status=to.value,
            reason=reason,
        )
    )
    row.status = to.value
    row.status_reason = reason
    row.updated_at = datetime.now(UTC)
    return True


def initial(s: AsyncSession, resource_type: str, row: HasStatus, reason: str | None = None) -> None:
    s.add(
        StatusHistory(
            org_id=row.org_id,
            resource_type=resource_type,
            resource_id=row.id,
            from_status=None,
            to_status=row.status,
            reason=reason,
        )
    )


def request_deactivation(s: AsyncSession, resource_type: str, row: HasStatus, reason: str) -> bool:
    """Move a live row to DEACTIVATING (the controller finishes the teardown); False when it
    is already deactivating or in a terminal status."""
    if Status(row.status) in TERMINAL or row.status == Status.DEACTIVATING.value:
        return False
    return transition(s, resource_type, row, Status.DEACTIVATING, reason)
