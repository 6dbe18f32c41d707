"""PostgreSQL and Redis for tests: the machine's own when they answer on 127.0.0.1:5432 /
6379 (or URLs in OPENLOOPS_TEST_DATABASE_URL / OPENLOOPS_TEST_REDIS_URL), otherwise the
embedded servers local mode uses, so the suite passes on a fresh laptop."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane.local_mode.embedded import start_postgres, start_valkey


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class TestServices:
    __test__ = False  # not a test class
    database_url: str
    redis_url: str
    _handles: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for h in self._handles:
            h.stop()


async def _can_connect_pg(url: str) -> bool:
    import asyncpg

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except Exception:
        return False
    await conn.close()
    return True


def start_services(tmp: Path) -> TestServices:
    handles: list[Any] = []
    db_url = os.environ.get("OPENLOOPS_TEST_DATABASE_URL")
    if not db_url and _port_open(5432):
        candidate = "postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/test"
        if asyncio.run(_can_connect_pg(candidate)):
            db_url = candidate
    if not db_url:
        # not under pytest's basetemp: pytest resets it to 0700, and the embedded server runs
        # as its own system user when the tests run as root
        pg_root = Path(tempfile.mkdtemp(prefix="openloops-test-pg-"))
        pg_root.chmod(0o755)
        pg = start_postgres(pg_root / "data", database="openloops_test")
        handles.append(pg)
        db_url = pg.url
    redis_url = os.environ.get("OPENLOOPS_TEST_REDIS_URL")
    if not redis_url and _port_open(6379):
        redis_url = "redis://127.0.0.1:6379/0"
    if not redis_url:
        vk = start_valkey()
        handles.append(vk)
        redis_url = vk.url
    return TestServices(db_url, redis_url, handles)
