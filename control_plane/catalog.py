"""The model catalog: which base models exist, where their weights come from, resources.

Loaded from YAML (Helm ConfigMap / local data dir). ``/v1/loops/capabilities`` and Tinker's
``get_server_capabilities`` are generated from it.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from control_plane.errors import InvalidInput
from control_plane.scheduler.protocol import Resources


class RoleResources(BaseModel):
    gpus: int = Field(0, ge=0)  # per node (a trainer runs one rank per GPU)
    nodes: int = Field(1, ge=1)  # > 1: a multi-node group (a LeaderWorkerSet on Kubernetes)
    gpu_type: str | None = None
    cpu: str | None = None
    memory: str | None = None
    shm: str | None = None

    def to_resources(self) -> Resources:
        return Resources(self.gpus, self.gpu_type, self.cpu, self.memory, self.shm)


class CatalogResources(BaseModel):
    trainer: RoleResources = Field(default_factory=RoleResources)
    sampler: RoleResources = Field(default_factory=RoleResources)


class CatalogModel(BaseModel):
    name: str
    source: str
    tokenizer_id: str | None = None
    max_context_length: int = Field(4096, ge=1)
    trainable: bool = True
    sampleable: bool = True
    supports_vision_language: bool = False
    resources: CatalogResources = Field(default_factory=CatalogResources)
    vllm_args: list[str] = Field(default_factory=list)

    @property
    def resolved_tokenizer_id(self) -> str:
        return self.tokenizer_id or self.source


class CatalogFile(BaseModel):
    models: list[CatalogModel] = Field(default_factory=list)


class CatalogError(ValueError):
    pass


class ModelCatalog:
    def __init__(self, models: list[CatalogModel]) -> None:
        self._models = {m.name: m for m in models}

    @classmethod
    def load(cls, path: Path) -> ModelCatalog:
        if not path.exists():
            return cls([])
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            return cls(CatalogFile.model_validate(raw).models)
        except (yaml.YAMLError, ValidationError) as exc:
            raise CatalogError(f"invalid model catalog {path}: {exc}") from exc

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = CatalogFile(models=list(self._models.values())).model_dump(mode="json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(path)

    def upsert(self, model: CatalogModel) -> None:
        self._models[model.name] = model

    @property
    def models(self) -> list[CatalogModel]:
        return list(self._models.values())

    def find(self, name: str) -> CatalogModel | None:
        """The entry named ``name``, or None (a model removed from the catalog)."""
        return self._models.get(name)

    def get(self, name: str, *, field: str = "base_model") -> CatalogModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "(none configured)"
            raise InvalidInput(f"unsupported base model {name!r}; supported: {known}", field=field)
        return model

    def trainable(self, name: str, *, field: str = "base_model") -> CatalogModel:
        model = self.get(name, field=field)
        if not model.trainable:
            raise InvalidInput(f"base model {name!r} is not trainable", field=field)
        return model
