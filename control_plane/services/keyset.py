"""Keyset pages of rows newest first (``created_at`` desc, then ``id`` desc): the token of a
page is the position after its last row, ``{created_at ISO 8601}|{id}``, opaque to clients."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.errors import InvalidInput


async def newest_first(
    s: AsyncSession, model: Any, conds: list[Any], limit: int, token: str | None, field: str
) -> tuple[list[Any], str | None]:
    """Up to ``limit`` rows of ``model`` matching ``conds`` after ``token`` (the query parameter
    ``field``: a bad token is a 400 naming it), and the token of the next page (None: last)."""
    where = list(conds)
    if token:
        at, sep, last_id = token.partition("|")
        try:
            after = datetime.fromisoformat(at)
        except ValueError:
            after = None
        if not sep or after is None or after.tzinfo is None:
            raise InvalidInput(f"{field} is not one this server gave out", field=field)
        where.append(or_(model.created_at < after, and_(model.created_at == after, model.id < last_id)))
    q = select(model).where(*where).order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list((await s.execute(q)).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (f"{rows[-1].created_at.isoformat()}|{rows[-1].id}" if more and rows else None)
