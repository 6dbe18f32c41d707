"""Builds/imports local models through the data plane's CLI (the control plane never imports
torch) and registers them in the model catalog."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from control_plane.catalog import CatalogModel, ModelCatalog

# CLI name -> (data_plane.models arguments, directory name)
LOCAL_MODELS = {
    "tiny": (["build", "tiny"], "tiny"),
    "bench": (["build", "bench"], "bench"),
    "smollm2": (["import", "smollm2"], "smollm2-135m-instruct"),
}

# `python -m data_plane.models` reports progress on stderr as "[done/total] message"
_STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
_ERROR_TAIL = 8  # unnumbered stderr lines quoted when the build fails

StepCallback = Callable[[int, int, str], None]


class ModelPrepError(RuntimeError):
    pass


def check_kind(kind: str) -> None:
    if kind not in LOCAL_MODELS:
        raise ModelPrepError(f"unknown local model {kind!r}; choose from {', '.join(LOCAL_MODELS)}")


def prepare(
    kind: str,
    models_root: Path,
    *,
    python: str | None = None,
    quiet: bool = False,
    log: TextIO | None = None,
    on_step: StepCallback | None = None,
) -> CatalogModel:
    """Build or import ``kind`` under ``models_root``. The builder's stderr goes to ``log``
    (else to this process's stderr, or nowhere when ``quiet``); each numbered progress step
    is also passed to ``on_step(done, total, message)``. A failure raises
    :class:`ModelPrepError` quoting the builder's last lines."""
    check_kind(kind)
    args, dirname = LOCAL_MODELS[kind]
    out = models_root / dirname
    cmd = [python or sys.executable, "-m", "data_plane.models", *args, "--out", str(out)]
    env = {**os.environ, "TQDM_DISABLE": "1"} if (log is not None or on_step is not None) else None
    tail: deque[str] = deque(maxlen=_ERROR_TAIL)
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        # stdout holds one short JSON line: reading stderr to its end first cannot deadlock
        for line in proc.stderr or ():
            if log is not None:
                log.write(line)
                log.flush()
            elif on_step is None:
                sys.stderr.write(line)
            step = _STEP.match(line.rstrip("\n"))
            if step is None:
                if line.strip():
                    tail.append(line.rstrip())
            elif on_step is not None:
                on_step(int(step.group(1)), int(step.group(2)), step.group(3))
        stdout = proc.stdout.read() if proc.stdout is not None else ""
        code = proc.wait()
    if code != 0:
        said = ("\n  " + "\n  ".join(tail)) if tail else ""
        raise ModelPrepError(f"preparing model {kind!r} failed (exit {code}); command: {' '.join(cmd)}{said}")
    manifest = json.loads(stdout.strip().splitlines()[-1])
    return CatalogModel(
        name=manifest["name"],
        source=manifest["path"],
        tokenizer_id=manifest["tokenizer_path"],
        max_context_length=manifest["max_context_length"],
    )


def register(catalog_path: Path, model: CatalogModel) -> ModelCatalog:
    catalog = ModelCatalog.load(catalog_path)
    catalog.upsert(model)
    catalog.dump(catalog_path)
    return catalog
