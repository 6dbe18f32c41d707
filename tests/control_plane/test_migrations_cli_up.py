"""Migrations up → down → up, the admin CLI end to end, and `openloops up` from an empty
data dir and again from the existing one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
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


@pytest.mark.slow  # the admin CLI in subprocesses, one per command
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


def _up_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLOOPS_")}
    env["COLUMNS"] = "200"
    return env


def _up_cmd(data_dir: Path, port: int) -> list[str]:
    cmd = ["-m", "control_plane.cli.main", "up", "--port", str(port), "--data-dir", str(data_dir), "--model", "tiny"]
    return [sys.executable, *cmd]


def _start_up(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], str, str, list[str]]:
    """Starts `openloops up` and reads its terminal output (stdout and stderr) up to the
    banner's last line."""
    p = subprocess.Popen(
        _up_cmd(data_dir, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_up_env()
    )
    url = key = None
    deadline = time.time() + 180
    lines: list[str] = []
    assert p.stdout is not None
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "openloops is up at" in line:
            url = line.split("openloops is up at", 1)[1].strip()
        if line.startswith("API key:"):
            key = line.split(":", 1)[1].strip()
        if line.startswith("Ctrl-C to stop"):
            break
    assert url and key, "\n".join(lines)
    return p, url, key, lines


CHATTER = ("initdb", "pg_ctl", "PG_VERSION", "postmaster", "Running upgrade", "Uvicorn", "registry updated")


def _assert_quiet_banner(lines: list[str], data_dir: Path, url: str, key: str, *, first_start: bool) -> None:
    """The terminal shows a short banner; what the servers said is in the log file."""
    text = "\n".join(lines)
    assert not [c for c in CHATTER if c in text], text
    progress = [line for line in lines if line.startswith("preparing tiny")]
    assert len(progress) == (1 if first_start else 0), text  # one progress bar, first start only
    if first_start:
        assert "3/3" in progress[0] and "openloops/tiny ready" in progress[0], progress
    assert len(lines) <= 12, text
    assert f"console: {url}/console (sign in with the API key)" in lines, text
    log = data_dir / "logs" / "openloops.log"
    assert f"export TINKER_BASE_URL={url} TINKER_API_KEY={key}" in lines, text
    assert f"export LOOPS_BASE_URL={url} BASETEN_API_KEY={key}" in lines, text
    assert any(line.startswith(f"logs: {log}") for line in lines), text
    logged = log.read_text()
    assert "Uvicorn running on" in logged and "pg_ctl" in logged
    if first_start:
        assert "initdb" in logged and "Running upgrade" in logged and "[3/3] registry updated" in logged


@pytest.mark.slow  # two `openloops up` starts, the first builds the tiny model
def test_openloops_up_fresh_then_restart() -> None:
    # not tmp_path: the embedded PostgreSQL runs as its own user when we are root, and pytest's
    # temporary directories are private to us
    root = Path(tempfile.mkdtemp(prefix="openloops-up-test-"))
    root.chmod(0o755)
    try:
        _fresh_then_restart(root / "ol")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _fresh_then_restart(data_dir: Path) -> None:
    port = free_port()
    p, url, key, lines = _start_up(data_dir, port)
    try:
        assert url == f"http://127.0.0.1:{port}" and key.startswith("tml-")
        _assert_quiet_banner(lines, data_dir, url, key, first_start=True)
        r = httpx.get(f"{url}/readyz", timeout=10)
        assert r.status_code == 200, r.text
        r = httpx.get(f"{url}/v1/loops/capabilities", headers={"X-API-Key": key}, timeout=10)
        assert r.status_code == 200 and len(r.json()["supported_models"]) == 1
        r = httpx.post(f"{url}/v1/loops/sessions", headers={"Authorization": f"Bearer {key}"}, json={}, timeout=10)
        sid = r.json()["session"]["id"]
        _assert_private(data_dir)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    assert p.stdout is not None
    after = p.stdout.read()
    assert "request" not in after and "stopped" not in after, after  # server logs go to the file
    assert not (data_dir / "runtime.json").exists()
    p2, url2, key2, lines2 = _start_up(data_dir, port)
    try:
        assert key2 == key  # same dev key, data persisted
        _assert_quiet_banner(lines2, data_dir, url2, key2, first_start=False)
        r = httpx.get(f"{url2}/v1/loops/sessions/{sid}", headers={"X-API-Key": key}, timeout=10)
        assert r.status_code == 200
    finally:
        p2.send_signal(signal.SIGINT)
        assert p2.wait(60) == 0
    log = (data_dir / "logs" / "openloops.log").read_text()
    assert log.count("===== openloops up: pid") == 2  # one section per start
    assert f"path=/v1/loops/sessions/{sid}" in log  # the access log went there too


# run as another user (nobody) with the system Python (no packages): what it can see of a
# running local mode
PROBE = r"""
import json, os, socket, sys
data_dir, pg_socket, valkey_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
def attempt(name, fn):
    try:
        out[name] = ["ok", str(fn())[:200]]
    except Exception as exc:
        out[name] = [type(exc).__name__, str(exc)[:200]]
attempt("list", lambda: os.listdir(data_dir))
for f in ("dev-credentials.json", "runtime.json", "models/catalog.yaml", "logs/openloops.log"):
    attempt(f, lambda f=f: open(os.path.join(data_dir, f)).read())
def pg():
    s = socket.socket(socket.AF_UNIX); s.connect(pg_socket); s.close()
attempt("postgres", pg)
def valkey():
    s = socket.create_connection(("127.0.0.1", valkey_port), timeout=5)
    s.sendall(b"PING\r\n")
    return s.recv(200).decode()
attempt("valkey", valkey)
print(json.dumps(out))
"""


def _assert_private(data_dir: Path) -> None:
    """The data dir and both servers are the owner's only: modes, and (as root) what another
    user can do — not list or read the data dir, not connect to PostgreSQL, not talk to Valkey
    without its password."""
    as_root = os.geteuid() == 0
    assert stat.S_IMODE(data_dir.stat().st_mode) == (0o711 if as_root else 0o700)
    for f in ("dev-credentials.json", "runtime.json", "models/catalog.yaml"):
        assert stat.S_IMODE((data_dir / f).stat().st_mode) == 0o600, f
    for d in ("logs", "valkey", "models"):
        assert stat.S_IMODE((data_dir / d).stat().st_mode) == 0o700, d
    runtime = json.loads((data_dir / "runtime.json").read_text())
    redis_url = urlsplit(runtime["redis_url"])
    assert redis_url.password and len(redis_url.password) >= 32  # Valkey requires its generated password
    pid_lines = (data_dir / "postgres" / "data" / "postmaster.pid").read_text().splitlines()
    pg_socket = f"{pid_lines[4]}/.s.PGSQL.{pid_lines[3]}"  # socket dir and port lines
    assert stat.S_IMODE(os.stat(pg_socket).st_mode) == 0o700
    if not as_root:
        return  # switching to another uid needs root: the modes above are what keeps it out
    r = subprocess.run(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            "/usr/bin/python3",
            "-c",
            PROBE,
            str(data_dir),
            pg_socket,
            str(redis_url.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    for what in (
        "list",
        "dev-credentials.json",
        "runtime.json",
        "models/catalog.yaml",
        "logs/openloops.log",
        "postgres",
    ):
        assert seen[what][0] == "PermissionError", (what, seen[what])
    assert seen["valkey"][0] == "ok" and seen["valkey"][1].startswith("-NOAUTH"), seen["valkey"]


def test_openloops_up_reports_a_postgres_failure(tmp_path: Path) -> None:
    """A PostgreSQL that cannot start: one clear error naming the cause and the log file, no
    traceback, exit status 1."""
    data_dir = tmp_path / "ol"
    (data_dir / "postgres").mkdir(parents=True)
    (data_dir / "postgres" / "data").write_text("not a directory")
    r = subprocess.run(_up_cmd(data_dir, free_port()), capture_output=True, text=True, env=_up_env(), timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    log = data_dir / "logs" / "openloops.log"
    assert r.stdout == ""
    assert "error: could not start embedded PostgreSQL" in r.stderr and "initdb exited with status 1" in r.stderr
    assert "Not a directory" in r.stderr  # the reason, from initdb's stderr
    assert f"details: {log}" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 4, r.stderr
    assert "Traceback" in log.read_text()  # the whole story is in the log
