"""``{data_dir}/runtime.json``: where a running ``openloops up`` serves, so that admin CLI
calls against the same data dir can reach its embedded Redis (e.g. to drop a revoked key
from the cache at once). It holds the Redis URL with its password: its owner's only (0600)."""

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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"pid": os.getpid(), **info}))
    tmp.chmod(0o600)  # an older file of that name may have had wider permissions
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
