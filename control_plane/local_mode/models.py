"""Builds/imports local models through the data plane's CLI (the control plane never imports
torch) and registers them in the model catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from control_plane.catalog import CatalogModel, ModelCatalog

# CLI name -> (data_plane.models arguments, directory name)
LOCAL_MODELS = {
    "tiny": (["build", "tiny"], "tiny"),
    "bench": (["build", "bench"], "bench"),
    "smollm2": (["import", "smollm2"], "smollm2-135m-instruct"),
}


class ModelPrepError(RuntimeError):
    pass


def prepare(kind: str, models_root: Path, *, python: str | None = None, quiet: bool = False) -> CatalogModel:
    if kind not in LOCAL_MODELS:
        raise ModelPrepError(f"unknown local model {kind!r}; choose from {', '.join(LOCAL_MODELS)}")
    args, dirname = LOCAL_MODELS[kind]
    out = models_root / dirname
    cmd = [python or sys.executable, "-m", "data_plane.models", *args, "--out", str(out)]
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None, text=True, check=False
    )
    if proc.returncode != 0:
        raise ModelPrepError(f"preparing model {kind!r} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
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
