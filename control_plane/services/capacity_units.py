"""What one workload holds, in units of a GPU type: the arithmetic of capacity.

- A trainer (a Loops deployment) holds its catalog entry's ``resources.trainer.gpus`` per node
  times ``nodes``, times the run's ``replicas``. A trainer without GPUs counts one unit of type
  ``cpu`` per rank (``trainer_ranks`` ranks per node), so local mode meets the same ceilings.
- A sampler workload (the shared vLLM server of a base model, or a served model's own server)
  holds ``resources.sampler.gpus`` per node times ``nodes``; one without GPUs counts one
  ``cpu`` unit.

A GPU count without a ``gpu_type`` counts as type ``gpu``.
"""

from __future__ import annotations

from collections import Counter

from control_plane.catalog import CatalogModel, RoleResources

CPU = "cpu"
ANY_GPU = "gpu"  # the type of GPUs a catalog entry does not name


def _units(res: RoleResources, cpu_units_per_node: int) -> Counter[str]:
    if res.gpus > 0:
        return Counter({res.gpu_type or ANY_GPU: res.gpus * res.nodes})
    return Counter({CPU: cpu_units_per_node * res.nodes})


def trainer_units(model: CatalogModel, replicas: int, trainer_ranks: int) -> Counter[str]:
    """The units a trainer of ``model`` with ``replicas`` data-parallel replicas holds."""
    one = _units(model.resources.trainer, trainer_ranks)
    return Counter({t: n * max(1, replicas) for t, n in one.items()})


def sampler_units(model: CatalogModel) -> Counter[str]:
    """The units one vLLM server of ``model`` holds."""
    return _units(model.resources.sampler, 1)
