"""Shared fixtures: real PostgreSQL (schema by Alembic) and Redis/Valkey for the session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.infra.services import TestServices, start_services

os.environ.setdefault("TINKER_TELEMETRY", "0")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServices]:
    svc = start_services(tmp_path_factory.mktemp("services"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def migrated_db(services: TestServices) -> str:
    from control_plane.db import migrate

    migrate.downgrade(services.database_url, "base")
    migrate.upgrade(services.database_url)
    return services.database_url


TABLES = (
    "status_history, request_buckets, usage_samples, served_models, checkpoint_files, checkpoints, samplers, "
    "runs, deployments, sessions, training_projects, api_keys, service_accounts, users, orgs"
)


@pytest.fixture
async def clean_state(migrated_db: str, services: TestServices) -> AsyncIterator[None]:
    """Empty tables and Redis before a test."""
    engine = create_async_engine(migrated_db)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {TABLES} CASCADE"))
    await engine.dispose()
    r = aioredis.Redis.from_url(services.redis_url)
    await r.flushdb()
    await r.aclose()
    yield


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "openloops-data"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def live_model(tmp_path_factory: pytest.TempPathFactory):
    """The tiny local model (built offline), as a catalog entry."""
    from control_plane.local_mode.models import prepare

    return prepare("tiny", tmp_path_factory.mktemp("live-models"), quiet=True)


@pytest.fixture(scope="session")
def live_server(services: TestServices, live_model, tmp_path_factory: pytest.TempPathFactory):
    """One live openloops server for the session (its own database and Redis db)."""
    from tests.infra.live_server import start_live_server

    server = start_live_server(
        services.database_url, services.redis_url, tmp_path_factory.mktemp("live-data"), live_model
    )
    yield server
    server.stop()


# --- tiers ------------------------------------------------------------------------------
# A test that uses one of these starts trainer worker processes, vLLM, a live server or the
# Loops client venv: it is in the `slow` tier (the fast tier is `pytest -m "not slow"`).
# Modules that start such processes themselves say so with `pytestmark = pytest.mark.slow`.
SLOW_FIXTURES = frozenset({"live_server", "live_stack", "vllm_server", "stack", "start_worker", "loops_client"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# --- the browser (console tests) ------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium under Playwright, one per test module (tests/infra/browser.py). Not
    per session: Playwright's sync API keeps an event loop running in this thread while it is
    open, and pytest-asyncio cannot run the async fixtures of later modules beside it."""
    from tests.infra.browser import chromium

    with chromium() as b:
        yield b


@pytest.fixture(scope="session")
def shots():
    """``shots(page, name)``: keep a screenshot of the page as a test artifact."""
    from tests.infra.browser import screenshots

    return screenshots()
