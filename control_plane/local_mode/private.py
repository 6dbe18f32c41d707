"""Local mode's data dir, private to the user who runs ``openloops up`` on a shared machine.

Everything ``openloops up`` and its workers create is created with umask 077 (files 0600,
directories 0700). The data dir itself is 0700 — or 0711 when running as root, because the
embedded PostgreSQL then runs as its own system user, which must traverse it to reach its
``postgres/data`` (the wheel opens the path's prefixes to that user; they are closed again here,
keeping only traversal). Its entries are made 0600/0700 at every start, so that a data dir
created by an older version, or by hand, is covered too. What makes the servers themselves
private is in :mod:`.embedded`.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077
POSTGRES_DIR = "postgres"  # the embedded PostgreSQL's part: its user must traverse it (as root)


def private_umask() -> None:
    """From now on this process, and every process it starts, creates private files."""
    os.umask(PRIVATE_UMASK)


def lock_down(data_dir: Path) -> None:
    """Make ``data_dir`` and its entries its owner's (see the module docstring)."""
    as_root = os.geteuid() == 0
    data_dir.chmod(0o711 if as_root else 0o700)
    for entry in data_dir.iterdir():
        if entry.is_symlink():
            continue
        if entry.name == POSTGRES_DIR and entry.is_dir():
            entry.chmod(0o711 if as_root else 0o700)
        elif entry.is_dir():
            entry.chmod(0o700)
        else:
            entry.chmod(0o600)
