"""Async engine, session factories and the hot-path reader of one process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from control_plane.db.read_cache import ReadCache
from control_plane.db.reader import Reader, connect_kwargs


class ReadOnlySessionError(RuntimeError):
    pass


def _refuse_flush(session: Session, *_: Any) -> None:
    raise ReadOnlySessionError(
        "Database.session() is a read-only autocommit session: write through Database.transaction()"
    )


def _replace_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Pool checkout: hand out no connection whose socket the server has closed (restart,
    failover, idle or admin termination); the pool drops it and connects anew.

    This replaces ``pool_pre_ping``, which costs three round trips per checkout with asyncpg
    (BEGIN; SELECT; ROLLBACK) and was half of the controller's CPU. asyncpg learns of a closed
    socket from the event loop as soon as the server closes it, so this check is free; a
    connection that dies while checked out fails that one statement, as with pre-ping."""
    raw = getattr(dbapi_connection, "driver_connection", None)
    is_closed = getattr(raw, "is_closed", None)
    if callable(is_closed) and is_closed():
        raise DisconnectionError("the server closed this pooled connection")


def _mark_write(session: Session) -> None:
    session.info["reads_dirty"] = True


class Database:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 10,
        read_pool_size: int = 10,
        read_cache_seconds: float = 0.0,
    ) -> None:
        """``read_cache_seconds`` > 0 turns on :attr:`read_cache` (API processes); 0 leaves it
        bypassed (CLI, workers, tests of the uncached path)."""
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        event.listen(self.engine.sync_engine.pool, "checkout", _replace_if_closed)
        # a Session class of this Database's own, so that its commit hooks reach its read cache
        tracked: type[Session] = type("TrackedSession", (Session,), {})
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False, sync_session_class=tracked)
        # reads: each statement in its own snapshot (what READ COMMITTED gives a multi-statement
        # read anyway) without the BEGIN/ROLLBACK round trips of a transaction
        self._read_sessions = async_sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False, autoflush=False
        )
        self.reader = Reader(url, max_size=read_pool_size)
        self.read_cache = ReadCache(connect_kwargs(url), ttl_s=read_cache_seconds)
        # a client reads its own writes: a commit that wrote anything drops this process's read
        # cache before the route answers (other processes hear of it through NOTIFY)
        event.listen(tracked, "after_flush", self._flushed)
        event.listen(tracked, "do_orm_execute", self._executed)
        event.listen(tracked, "after_commit", self._committed)
        event.listen(tracked, "after_rollback", self._rolled_back)

    @staticmethod
    def _flushed(session: Session, _ctx: Any) -> None:
        if session.new or session.dirty or session.deleted:
            _mark_write(session)

    @staticmethod
    def _executed(state: Any) -> None:
        if not state.is_select:  # DML statements, text() of any kind
            _mark_write(state.session)

    def _committed(self, session: Session) -> None:
        if session.info.pop("reads_dirty", False):
            self.read_cache.clear()

    @staticmethod
    def _rolled_back(session: Session) -> None:
        session.info.pop("reads_dirty", None)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A read-only session (autocommit; a flush raises :class:`ReadOnlySessionError`)."""
        async with self._read_sessions() as s:
            event.listen(s.sync_session, "before_flush", _refuse_flush)
            yield s

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as s, s.begin():
            yield s

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self.read_cache.close()
        await self.reader.close()
        await self.engine.dispose()
