"""What a built/imported model directory holds, and the ``models.yaml`` registry of a models root.

Each model directory carries ``openloops-model.json`` (a :class:`ModelManifest`). A models root
(e.g. ``<data dir>/models``) holds one directory per model plus ``models.yaml``, regenerated
from the manifests by :func:`update_registry`. No torch import here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MANIFEST_FILE = "openloops-model.json"
REGISTRY_FILE = "models.yaml"


@dataclass(frozen=True, slots=True)
class ModelManifest:
    name: str  # suggested base_model name (e.g. "openloops/tiny")
    path: str  # absolute directory: config.json + *.safetensors + tokenizer files
    tokenizer_path: str  # absolute directory AutoTokenizer.from_pretrained can load
    max_context_length: int
    architecture: str
    num_parameters: int
    dtype: str
    source: str
    preset: str | None = None


def write_manifest(model_dir: Path, manifest: ModelManifest) -> None:
    (Path(model_dir) / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")


def read_manifest(model_dir: Path) -> ModelManifest:
    d = json.loads((Path(model_dir) / MANIFEST_FILE).read_text())
    known = {f.name for f in fields(ModelManifest)}
    return ModelManifest(**{k: v for k, v in d.items() if k in known})


def scan(models_root: Path) -> list[ModelManifest]:
    """Manifests of every model directory directly under ``models_root`` (sorted by name)."""
    root = Path(models_root)
    if not root.is_dir():
        return []
    found = [read_manifest(d) for d in sorted(root.iterdir()) if (d / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda m: m.name)


def update_registry(models_root: Path) -> Path:
    """Rewrite ``models_root/models.yaml`` from the manifests found there."""
    import yaml

    root = Path(models_root)
    root.mkdir(parents=True, exist_ok=True)
    doc = {"models": [asdict(m) for m in scan(root)]}
    path = root / REGISTRY_FILE
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return path
