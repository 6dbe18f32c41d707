"""A live openloops server for end-to-end tests: the real ``serve()`` (API, controller with
the local process backend, completion consumer) on a real port, in a thread with its own
event loop, against its own PostgreSQL database and Redis db number, so that tests which
truncate the shared test database never touch it. Trainer workers are real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from control_plane.catalog import CatalogModel, ModelCatalog
from control_plane.db import migrate
from control_plane.event_loop import loop_factory
from control_plane.runtime import Runtime, build_runtime
from control_plane.scheduler.ports import free_port
from control_plane.server import serve
from control_plane.services import identity
from control_plane.settings import Settings


async def _create_database(admin_url: str, name: str) -> str:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _redis_db(url: str, db: int) -> str:
    base = url.split("?", 1)[0]
    head, _, tail = base.rpartition("/")
    if tail.isdigit() and "://" in head:
        return f"{head}/{db}"
    return f"{base.rstrip('/')}/{db}"


@dataclass
class LiveServer:
    settings: Settings
    model: CatalogModel
    api_key: str = ""
    org_id: str = ""
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _runtime: Runtime | None = None
    _error: list[BaseException] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None
        return self._runtime

    def start(self, timeout_s: float = 60.0) -> None:
        ready = threading.Event()

        def _on_ready(rt: Runtime) -> None:
            self._runtime = rt
            ready.set()

        def _main() -> None:
            loop = loop_factory(self.settings.event_loop)()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._stop = asyncio.Event()

            async def _serve() -> None:
                task = asyncio.create_task(serve(self.settings, on_ready=_on_ready, install_signal_handlers=False))
                stop_wait = asyncio.create_task(self._stop.wait())  # type: ignore[union-attr]
                await asyncio.wait([task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

            try:
                loop.run_until_complete(_serve())
            except BaseException as exc:
                self._error.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=_main, name="openloops-live", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s) or self._error:
            raise RuntimeError(f"live server did not start: {self._error!r}")

    def call(self, coro: Any, timeout_s: float = 60.0) -> Any:
        """Run a coroutine on the server's loop (e.g. queries through its runtime)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)


def start_live_server(
    database_url: str, redis_url: str, data_dir: Path, model: CatalogModel, *, redis_db: int = 7, **overrides: Any
) -> LiveServer:
    """A fresh database (migrated by Alembic) and Redis db for one server, plus a tenant."""
    db_url = asyncio.run(_create_database(database_url, f"openloops_live_{secrets.token_hex(4)}"))
    migrate.upgrade(db_url)
    rurl = _redis_db(redis_url, redis_db)
    catalog = data_dir / "catalog.yaml"
    ModelCatalog([model]).dump(catalog)
    base: dict[str, Any] = dict(
        database_url=db_url,
        redis_url=rurl,
        data_dir=data_dir,
        model_catalog_path=catalog,
        port=free_port(),
        access_log=False,
        log_json=False,
        rate_limit_enabled=False,
        controller_interval_seconds=0.5,
        future_poll_timeout_seconds=10.0,
        # small chunks: a forward_backward of a few datums becomes several requests that the
        # SDK sends concurrently (the first one last), exercising seq_id buffering
        tinker_fwdbwd_max_chunk_len=2,
        # snapshots every 2 s of training (not 60): executed ops leave the op log soon, and the
        # tests exercise snapshots as they train
        trainer_snapshot_interval_seconds=2.0,
    )
    base.update(overrides)
    settings = Settings(**base)

    async def _tenant() -> tuple[str, str]:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(rurl)
        await r.flushdb()
        await r.aclose()
        rt = build_runtime(settings, with_backend=False)
        try:
            async with rt.db.transaction() as s:
                org = await identity.create_org(s, "e2e")
                user = await identity.create_user(s, org, "e2e@example.com")
                key = await identity.create_api_key(s, user)
            return key.plaintext, org.id
        finally:
            await rt.close()

    key, org_id = asyncio.run(_tenant())
    server = LiveServer(settings=settings, model=model, api_key=key, org_id=org_id)
    server.start()
    return server
