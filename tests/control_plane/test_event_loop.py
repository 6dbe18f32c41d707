"""The API process's event loop is a setting (OPENLOOPS_EVENT_LOOP): asyncio by default,
uvloop on request, and a clear error where uvloop is asked for but missing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from control_plane import event_loop
from control_plane.settings import Settings


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_is_the_default_and_the_setting_is_validated() -> None:
    assert Settings().event_loop == "asyncio"
    assert Settings(event_loop="uvloop").event_loop == "uvloop"
    with pytest.raises(ValidationError, match="event_loop"):
        Settings(event_loop="trio")
    assert event_loop.run(_loop_module(), "asyncio").startswith("asyncio")


def test_uvloop_when_asked_for() -> None:
    pytest.importorskip("uvloop")
    assert event_loop.run(_loop_module(), "uvloop").startswith("uvloop")


def test_uvloop_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    with pytest.raises(event_loop.EventLoopUnavailable, match="OPENLOOPS_EVENT_LOOP=uvloop"):
        event_loop.loop_factory("uvloop")


def test_serve_refuses_to_start_without_the_chosen_loop(tmp_path: Path) -> None:
    # a uvloop that cannot be imported, shadowing the installed one
    (tmp_path / "uvloop.py").write_text("raise ImportError('not here')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "OPENLOOPS_EVENT_LOOP": "uvloop",
        "OPENLOOPS_DATA_DIR": str(tmp_path / "data"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "control_plane.cli.main", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "OPENLOOPS_EVENT_LOOP=uvloop" in r.stderr and "not installed" in r.stderr
