"""The servers a benchmark runs against: embedded PostgreSQL + Valkey (or the URLs in
OPENLOOPS_BENCH_DATABASE_URL / OPENLOOPS_BENCH_REDIS_URL, which must point at a throwaway
database: the benchmark empties its tables), migrated with Alembic, plus the settings the API
processes are started with."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane.catalog import CatalogModel, ModelCatalog
from control_plane.db import migrate
from control_plane.local_mode.embedded import start_postgres, start_valkey

BENCH_MODEL = "bench/model"
OTHER_MODEL = "bench/other-model"


@dataclass
class Stack:
    database_url: str
    redis_url: str
    data_dir: Path
    _handles: list[Any] = field(default_factory=list)
    _tmp: list[Path] = field(default_factory=list)

    def server_env(self, **extra: str) -> dict[str, str]:
        """Environment of an API server process (read by ``Settings``)."""
        env = {
            "OPENLOOPS_DATABASE_URL": self.database_url,
            "OPENLOOPS_REDIS_URL": self.redis_url,
            "OPENLOOPS_DATA_DIR": str(self.data_dir),
            "OPENLOOPS_MODEL_CATALOG_PATH": str(self.data_dir / "catalog.yaml"),
            # one key drives all the load: keep the token bucket on (same code path as
            # production) but far above what the machine can serve
            "OPENLOOPS_RATE_LIMIT_PER_SECOND": "1000000",
            "OPENLOOPS_RATE_LIMIT_BURST": "1000000",
        }
        env.update(extra)
        return env

    def stop(self) -> None:
        for h in reversed(self._handles):
            try:
                h.stop()
            except Exception as exc:  # noqa: BLE001 - report and keep stopping the rest
                print(f"warning: stopping {h!r} failed: {exc}")
        for d in self._tmp:
            shutil.rmtree(d, ignore_errors=True)


def start_stack(*, embedded: bool = False) -> Stack:
    """``embedded``: start embedded servers even where OPENLOOPS_BENCH_* name others (a second
    stack beside the first)."""
    handles: list[Any] = []
    tmp: list[Path] = []
    db_url = None if embedded else os.environ.get("OPENLOOPS_BENCH_DATABASE_URL")
    redis_url = None if embedded else os.environ.get("OPENLOOPS_BENCH_REDIS_URL")
    try:
        if not db_url:
            # the embedded server runs as its own system user when we are root: its data
            # dir's parents must be traversable
            pg_root = Path(tempfile.mkdtemp(prefix="openloops-bench-pg-"))
            pg_root.chmod(0o755)
            tmp.append(pg_root)
            pg = start_postgres(pg_root / "data", database="openloops_bench")
            handles.append(pg)
            db_url = pg.url
        if not redis_url:
            vk = start_valkey()
            handles.append(vk)
            redis_url = vk.url
        data_dir = Path(tempfile.mkdtemp(prefix="openloops-bench-data-"))
        tmp.append(data_dir)
        migrate.upgrade(db_url)
        ModelCatalog(
            [
                CatalogModel(name=BENCH_MODEL, source=str(data_dir / "models" / "bench"), max_context_length=2048),
                CatalogModel(name=OTHER_MODEL, source=str(data_dir / "models" / "other"), max_context_length=2048),
            ]
        ).dump(data_dir / "catalog.yaml")
    except BaseException:
        Stack("", "", Path("."), handles, tmp).stop()
        raise
    return Stack(db_url, redis_url, data_dir, handles, tmp)
