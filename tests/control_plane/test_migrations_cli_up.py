"""Migrations up → down → up, the admin CLI end to end, and `openloops up` from an empty
data dir and again from the existing one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from control_plane.db import migrate
from control_plane.scheduler.ports import free_port


async def _tables(url: str) -> set[str]:
    eng = create_async_engine(url)
    async with eng.connect() as c:
        names = await c.run_sync(lambda sc: set(inspect(sc).get_table_names()))
    await eng.dispose()
    return names


async def test_upgrade_downgrade_upgrade(migrated_db, clean_state):
    assert "runs" in await _tables(migrated_db)
    migrate.downgrade(migrated_db, "base")
    assert await _tables(migrated_db) <= {"alembic_version"}
    assert await migrate.current_revision(migrated_db) is None
    migrate.upgrade(migrated_db)
    assert await migrate.current_revision(migrated_db) == migrate.head_revision()
    assert {"orgs", "api_keys", "runs", "samplers", "checkpoints", "deployments", "status_history"} <= await _tables(
        migrated_db
    )


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_plane.cli.main", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_admin_cli(migrated_db, clean_state, services, tmp_path):
    env = {
        **os.environ,
        "OPENLOOPS_DATABASE_URL": migrated_db,
        "OPENLOOPS_REDIS_URL": services.redis_url,
        "OPENLOOPS_DATA_DIR": str(tmp_path),
        "COLUMNS": "200",
    }
    r = _cli(["admin", "orgs", "create", "acme", "--json"], env)
    assert r.returncode == 0, r.stderr
    org = json.loads(r.stdout)
    assert org["name"] == "acme"
    assert _cli(["admin", "orgs", "create", "acme"], env).returncode == 1  # conflict, clear error
    assert _cli(["admin", "users", "create", "--org", "acme", "--email", "a@acme.io", "--json"], env).returncode == 0
    assert (
        _cli(["admin", "service-accounts", "create", "--org", "acme", "--name", "ci-bot", "--json"], env).returncode
        == 0
    )
    r = _cli(
        [
            "admin",
            "keys",
            "create",
            "--org",
            "acme",
            "--owner",
            "ci-bot",
            "--scope",
            "manage_own_user_or_service_account",
            "--json",
        ],
        env,
    )
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)
    assert key["key"].startswith("tml-") and key["scopes"] == ["manage_own_user_or_service_account"]
    r = _cli(["admin", "keys", "create", "--org", "acme", "--owner", "a@acme.io", "--scope", "bogus"], env)
    assert r.returncode == 1 and "unknown scope" in r.stderr
    r = _cli(["admin", "keys", "list", "--org", "acme", "--json"], env)
    keys = json.loads(r.stdout)
    assert [k["id"] for k in keys] == [key["id"]] and "key" not in keys[0]
    r = _cli(["admin", "keys", "list", "--org", "acme"], env)
    assert key["prefix"] in r.stdout  # rich table
    r = _cli(["admin", "keys", "revoke", key["id"], "--json"], env)
    assert r.returncode == 0 and json.loads(r.stdout)["revoked_at"]
    assert json.loads(_cli(["admin", "keys", "list", "--org", "acme", "--json"], env).stdout) == []
    for sub in (
        ["runs", "list"],
        ["samplers", "list"],
        ["deployments", "list"],
        ["checkpoints", "list", "--base-model", "x"],
    ):
        r = _cli(["admin", *sub, "--org", "acme", "--json"], env)
        assert r.returncode == 0 and json.loads(r.stdout) == [], (sub, r.stderr)
    r = _cli(["admin", "deployments", "deactivate", "dep-missing", "--org", "acme"], env)
    assert r.returncode == 1 and "not found" in r.stderr
    r = _cli(["admin", "db", "current", "--json"], env)
    assert json.loads(r.stdout)["up_to_date"] is True


def _start_up(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLOOPS_")}
    env["COLUMNS"] = "200"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control_plane.cli.main",
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--model",
            "tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = key = None
    deadline = time.time() + 180
    lines = []
    assert p.stdout is not None
    while time.time() < deadline and (url is None or key is None):
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "openloops is up at" in line:
            url = line.split("openloops is up at", 1)[1].strip()
        if line.startswith("API key:"):
            key = line.split(":", 1)[1].strip()
    assert url and key, "".join(lines)
    return p, url, key


def test_openloops_up_fresh_then_restart():
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="openloops-up-test-"))
    root.chmod(0o755)  # the embedded PostgreSQL runs as its own user when we are root
    data_dir = root / "ol"
    port = free_port()
    p, url, key = _start_up(data_dir, port)
    try:
        assert url == f"http://127.0.0.1:{port}" and key.startswith("tml-")
        r = httpx.get(f"{url}/readyz", timeout=10)
        assert r.status_code == 200, r.text
        r = httpx.get(f"{url}/v1/loops/capabilities", headers={"X-API-Key": key}, timeout=10)
        assert r.status_code == 200 and len(r.json()["supported_models"]) == 1
        r = httpx.post(f"{url}/v1/loops/sessions", headers={"Authorization": f"Bearer {key}"}, json={}, timeout=10)
        sid = r.json()["session"]["id"]
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    assert not (data_dir / "runtime.json").exists()
    p2, url2, key2 = _start_up(data_dir, port)
    try:
        assert key2 == key  # same dev key, data persisted
        r = httpx.get(f"{url2}/v1/loops/sessions/{sid}", headers={"X-API-Key": key}, timeout=10)
        assert r.status_code == 200
    finally:
        p2.send_signal(signal.SIGINT)
        assert p2.wait(60) == 0
