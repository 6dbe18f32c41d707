"""The read path of the hottest routes: SQLAlchemy Core statements compiled once for
PostgreSQL and run as prepared statements on an asyncpg pool of their own, in autocommit.

The ORM session costs about a millisecond of CPU per statement on a small machine (session and
pool bookkeeping, greenlet switches, compile-cache lookups, entity loading); an authenticated
``GET /v1/loops/runs/{id}`` made three of them. Here a route pays for one round trip and the
driver's row decoding. Statements are still built with SQLAlchemy (one schema, no hand-written
SQL strings); rows come back as read-only :class:`Row` views whose attributes are the selected
column labels, so presenters written against ORM rows take them unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

_DIALECT = asyncpg_dialect()
_CONNECTION_LOST = (asyncpg.ConnectionDoesNotExistError, asyncpg.CannotConnectNowError, ConnectionResetError)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A compiled statement: its SQL text (``$n`` placeholders) and its parameters in order,
    with the values of literal binds (``LIMIT 1``) kept as defaults."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]

    @classmethod
    def of(cls, statement: ClauseElement) -> Prepared:
        compiled = statement.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)  # a statement, not DDL
        return cls(compiled.string, tuple(compiled.positiontup or ()), dict(compiled.params))

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        missing = [n for n in self.names if n not in values and self.defaults.get(n) is None]
        if missing:
            raise TypeError(f"missing parameters {missing} for: {self.sql}")
        return [values[n] if n in values else self.defaults[n] for n in self.names]


class Row:
    """A record's columns as attributes (all of them, or those labelled ``prefix*`` without
    the prefix: a joined row's second table). Copied once: attribute reads stay plain."""

    def __init__(self, record: asyncpg.Record, prefix: str = "") -> None:
        if prefix:
            n = len(prefix)
            self.__dict__.update((k[n:], v) for k, v in record.items() if k.startswith(prefix))
        else:
            self.__dict__.update(record.items())

    def __repr__(self) -> str:
        return f"Row({self.__dict__!r})"

    if TYPE_CHECKING:  # the columns are only known at runtime

        def __getattr__(self, name: str) -> Any: ...


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _release(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset sends "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    # RESET ALL" on every release: a round trip per request. This pool only ever runs single
    # autocommit SELECTs (no locks, cursors, LISTEN or SET), so only an open transaction —
    # which never happens here — would need undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def connect_kwargs(url: str) -> dict[str, Any]:
    """``asyncpg.connect`` arguments for a SQLAlchemy URL: host, database, credentials and the
    URL's driver options (ssl, server_settings, ...) — without the prepared_statement_* ones,
    which belong to SQLAlchemy's adapter, not to asyncpg."""
    _args, kwargs = _DIALECT.create_connect_args(make_url(url))
    out = {k: v for k, v in kwargs.items() if not k.startswith("prepared_statement_")}
    if "command_timeout" in out:
        out["command_timeout"] = float(out["command_timeout"])
    return out


class Reader:
    def __init__(self, url: str, *, max_size: int) -> None:
        self._connect_kwargs = connect_kwargs(url)
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        **self._connect_kwargs,
                        min_size=0,
                        max_size=self._max_size,
                        init=_init_connection,
                        reset=_release,
                        max_inactive_connection_lifetime=300,
                    )
        return self._pool

    async def one(self, query: Prepared, **values: Any) -> asyncpg.Record | None:
        return await self._run("fetchrow", query, values)

    async def all(self, query: Prepared, **values: Any) -> list[asyncpg.Record]:
        return await self._run("fetch", query, values)

    async def _run(self, method: str, query: Prepared, values: Mapping[str, Any]) -> Any:
        args = query.args(values)
        pool = await self._get_pool()
        try:
            return await getattr(pool, method)(query.sql, *args)
        except _CONNECTION_LOST:
            # a pooled connection died with its server (restart, failover, idle kill): the
            # pool drops it; a read is safe to send once more on a fresh one
            return await getattr(pool, method)(query.sql, *args)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
