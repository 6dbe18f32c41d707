"""The ORM pool hands out live connections without pre-ping (control_plane/db/engine.py)."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from control_plane.db.engine import Database


async def _terminate(url: str, pid: int) -> None:
    killer = Database(url, pool_size=1, max_overflow=0)
    try:
        async with killer.engine.connect() as c:
            assert (await c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})).scalar() is True
    finally:
        await killer.close()


async def test_a_pooled_connection_the_server_killed_is_replaced(api) -> None:
    # one pooled connection, so the next checkout is the killed one
    db = Database(api.runtime.db.url, pool_size=1, max_overflow=0)
    try:
        async with db.session() as s:
            first = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await _terminate(db.url, first)
        await asyncio.sleep(0.2)  # the pool's socket sees the server's close on the next loop turns
        async with db.session() as s:  # a read, then a write: neither fails
            second = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert second != first
        await _terminate(db.url, second)
        await asyncio.sleep(0.2)
        async with db.transaction() as s:
            third = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert third not in (first, second)
    finally:
        await db.close()
