"""An in-process API (real Postgres/Redis/object store) and tenants with keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.api.app import create_app
from control_plane.auth.principal import Principal
from control_plane.catalog import CatalogModel, ModelCatalog
from control_plane.runtime import Runtime, build_runtime
from control_plane.scheduler.ports import free_port
from control_plane.services import identity
from control_plane.settings import Settings
from control_plane.statuses import Scope
from tests.infra.api_server import ApiServer
from tests.infra.services import TestServices

TEST_MODEL = "tiny/tiny-llm"
OTHER_MODEL = "tiny/other-llm"


def make_settings(services: TestServices, data_dir: Path, **overrides: object) -> Settings:
    catalog = data_dir / "catalog.yaml"
    cat = ModelCatalog(
        [
            CatalogModel(name=TEST_MODEL, source=str(data_dir / "models" / "tiny"), max_context_length=512),
            CatalogModel(
                name=OTHER_MODEL, source=str(data_dir / "models" / "other"), max_context_length=1024, sampleable=False
            ),
        ]
    )
    cat.dump(catalog)
    base = dict(
        database_url=services.database_url,
        redis_url=services.redis_url,
        data_dir=data_dir,
        model_catalog_path=catalog,
        access_log=False,
        rate_limit_enabled=False,
        public_base_url="http://testserver",
    )
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@dataclass
class Tenant:
    org_id: str
    user_id: str
    key: str
    principal: Principal

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def make_tenant(
    runtime: Runtime, org_name: str, *, scopes: list[str] | None = None, email: str = "u@example.com"
) -> Tenant:
    async with runtime.db.transaction() as s:
        try:
            org = await identity.get_org(s, org_name)
        except Exception:
            org = await identity.create_org(s, org_name)
        user = await identity.create_user(s, org, email)
        key = await identity.create_api_key(s, user, scopes=scopes)
    return Tenant(
        org.id,
        user.id,
        key.plaintext,
        Principal(org.id, user.id, key.row.id, frozenset(key.row.scopes)),
    )


@dataclass
class Api:
    runtime: Runtime
    client: httpx.AsyncClient

    async def tenant(self, org: str, *, scopes: list[str] | None = None, email: str = "u@example.com") -> Tenant:
        return await make_tenant(self.runtime, org, scopes=scopes, email=email)


@pytest.fixture
async def api(clean_state: None, services: TestServices, data_dir: Path) -> AsyncIterator[Api]:
    settings = make_settings(services, data_dir)
    runtime = build_runtime(settings, with_backend=False)
    app = create_app(runtime)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Api(runtime, client)
    await runtime.close()


@pytest.fixture
def start_api_server(clean_state: None, services: TestServices, data_dir: Path) -> Iterator[Callable[..., ApiServer]]:
    """Start the API alone under uvicorn on a real port (no controller: no worker ever starts),
    with settings overrides; stopped after the test."""
    started: list[ApiServer] = []

    def start(**overrides: Any) -> ApiServer:
        port = free_port()
        settings = make_settings(services, data_dir, port=port, public_base_url=f"http://127.0.0.1:{port}", **overrides)
        server = ApiServer(settings)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


ALL = [s.value for s in Scope]
ORG_ONLY = [Scope.MANAGE_ORG_TRAINING_PROJECTS.value]
OWN_ONLY = [Scope.MANAGE_OWN.value]
