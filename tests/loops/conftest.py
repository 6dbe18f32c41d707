"""The official Baseten Loops SDK (and its Tinker shim, and tinker-cookbook), unmodified, as a
client of the session's live server, run in its own Python 3.12 venv (tests/infra/loops_client.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.infra.loops_client import ClientProcess, ClientResult, require_loops_python, run_client, start_client


@dataclass(frozen=True)
class LoopsClient:
    """Runs client scripts in the Loops venv against one server."""

    python: Path
    base_url: str
    api_key: str

    def run(
        self, script: str | Path, *, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None
    ) -> ClientResult:
        return run_client(script, base_url=self.base_url, api_key=self.api_key, env=env, timeout=timeout, cwd=cwd)

    def start(self, script: str | Path, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> ClientProcess:
        """Start a script without waiting for it (``ClientProcess.wait`` gives its result)."""
        return start_client(script, base_url=self.base_url, api_key=self.api_key, env=env, cwd=cwd)


@pytest.fixture(scope="session")
def loops_client(request: pytest.FixtureRequest) -> LoopsClient:
    """The Loops client bound to the live server; skips without the venv (fails under CI=true)."""
    python = require_loops_python()  # before the server starts: a skip then costs nothing
    live_server = request.getfixturevalue("live_server")
    return LoopsClient(python=python, base_url=live_server.base_url, api_key=live_server.api_key)


@pytest.fixture(scope="module", autouse=True)
def _end_module_runs(request: pytest.FixtureRequest):
    """Deactivate the runs a module's clients created (the Loops SDK has no call for it), so
    their trainer workers do not stay up for the rest of the session."""
    live_server = request.getfixturevalue("live_server")
    headers = {"Authorization": f"Api-Key {live_server.api_key}"}

    def active() -> set[str]:
        runs = httpx.get(f"{live_server.base_url}/v1/loops/runs", params={"scope": "org"}, headers=headers, timeout=30)
        return {
            r["id"] for r in runs.json()["runs"] if r["status"]["name"] not in ("INACTIVE", "FAILED", "DEACTIVATING")
        }

    before = active()
    yield
    for run_id in active() - before:
        httpx.post(f"{live_server.base_url}/v1/loops/runs/{run_id}/deactivate", headers=headers, timeout=30)
