"""How the controller tells a trainer worker where Redis is: in the launch document locally,
from the worker Secret on Kubernetes (the URL may carry a password); and which capacity the
trainer runs on (its deployment's availability model)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from control_plane.catalog import CatalogModel, ModelCatalog
from control_plane.controller.workloads import trainer_spec
from control_plane.db.models import Deployment
from control_plane.runtime import build_runtime
from control_plane.scheduler.protocol import Capacity
from control_plane.settings import Settings
from data_plane.wire.worker_config import ENV_VAR, REDIS_URL_ENV, TrainerLaunch

SECRET_URL = "redis://:s3cret@redis.example:6379/0"


def _runtime(tmp_path: Path, backend: str):
    catalog = tmp_path / "catalog.yaml"
    ModelCatalog([CatalogModel(name="tiny/tiny-llm", source="/models/tiny")]).dump(catalog)
    settings = Settings(
        database_url="postgresql+asyncpg://u:p@127.0.0.1:1/x",
        redis_url=SECRET_URL,
        data_dir=tmp_path,
        model_catalog_path=catalog,
        backend=backend,
        kubernetes={"worker_secret_name": "openloops-worker"},
    )
    return build_runtime(settings, with_backend=False)


def _deployment(availability_model: str = "dedicated") -> Deployment:
    now = datetime.now(UTC)
    return Deployment(
        id="dep-1",
        org_id="org-1",
        created_by="usr-1",
        base_model="tiny/tiny-llm",
        status="DEPLOYING",
        availability_model=availability_model,
        max_seq_len=256,
        scale_down_delay_seconds=60,
        created_at=now,
        updated_at=now,
    )


async def test_kubernetes_trainer_gets_redis_from_the_secret(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, "kubernetes")
    try:
        spec = trainer_spec(rt, _deployment())
    finally:
        await rt.close()
    assert REDIS_URL_ENV in spec.secret_env
    assert "s3cret" not in json.dumps(spec.env)
    launch = TrainerLaunch.from_env({**spec.env, REDIS_URL_ENV: SECRET_URL})
    assert launch.redis_url == SECRET_URL
    with pytest.raises(ValueError, match=REDIS_URL_ENV):
        TrainerLaunch.from_env({ENV_VAR: spec.env[ENV_VAR]})


async def test_local_trainer_gets_redis_in_its_config(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, "local")
    try:
        spec = trainer_spec(rt, _deployment())
    finally:
        await rt.close()
    assert REDIS_URL_ENV not in spec.secret_env
    assert TrainerLaunch.from_env(spec.env).redis_url == SECRET_URL


async def test_the_trainer_runs_on_its_deployments_capacity(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, "kubernetes")
    try:
        spot = trainer_spec(rt, _deployment("spot"))
        dedicated = trainer_spec(rt, _deployment("dedicated"))
    finally:
        await rt.close()
    assert (spot.capacity, dedicated.capacity) == (Capacity.SPOT, Capacity.DEDICATED)
