"""First-start bootstrap of local mode: the dev org, user and key (kept in the data dir so a
second start prints the same key)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from control_plane.db.engine import Database
from control_plane.errors import NotFound
from control_plane.services import identity


def credentials_path(data_dir: Path) -> Path:
    return data_dir / "dev-credentials.json"


async def ensure_dev_key(db: Database, data_dir: Path, org_name: str, email: str) -> str:
    path = credentials_path(data_dir)
    if path.exists():
        return str(json.loads(path.read_text())["api_key"])
    async with db.transaction() as s:
        try:
            org = await identity.get_org(s, org_name)
        except NotFound:
            org = await identity.create_org(s, org_name)
        try:
            owner = await identity.find_owner(s, org, email)
        except NotFound:
            owner = await identity.create_user(s, org, email, "local developer")
        created = await identity.create_api_key(s, owner, name="local-dev")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"api_key": created.plaintext, "org": org.name, "key_id": created.row.id}))
    tmp.chmod(0o600)
    tmp.replace(path)
    return created.plaintext
