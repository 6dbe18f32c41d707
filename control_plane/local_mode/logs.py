"""The log file of ``openloops up``: ``{data_dir}/logs/openloops.log``.

Everything the local stack says goes there — the embedded PostgreSQL's and Valkey's start-up
output, migrations, the first-start model build, the API server's and the controller's log
lines — while the terminal shows the banner, progress, warnings and errors. Each start appends
a header line, so the file reads as one section per run. Workers (trainers, vLLM) write their
own files under ``{data_dir}/workers/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TextIO


def log_path(data_dir: Path) -> Path:
    return data_dir / "logs" / "openloops.log"


def workers_dir(data_dir: Path) -> Path:
    # where the local process backend keeps its workers' files (control_plane/runtime.py)
    return data_dir / "workers"


def open_log(data_dir: Path) -> TextIO:
    """The log file, opened for appending (line-buffered), with this run's header written."""
    path = log_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("a", encoding="utf-8", buffering=1)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fh.write(f"\n===== openloops up: pid {os.getpid()}, {started} =====\n")
    return fh
