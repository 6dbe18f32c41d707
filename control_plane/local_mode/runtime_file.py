"""``{data_dir}/runtime.json``: where a running ``openloops up`` serves, so that admin CLI
calls against the same data dir can reach its embedded Redis (e.g. to drop a revoked key
from the cache at once)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def path(data_dir: Path) -> Path:
    return data_dir / "runtime.json"


def write(data_dir: Path, **info: Any) -> None:
    p = path(data_dir)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(p)


def read_live(data_dir: Path) -> dict[str, Any] | None:
    p = path(data_dir)
    try:
        info = json.loads(p.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return info


def remove(data_dir: Path) -> None:
    try:
        info = json.loads(path(data_dir).read_text())
        if int(info.get("pid", -1)) == os.getpid():
            path(data_dir).unlink()
    except (OSError, ValueError):
        pass
