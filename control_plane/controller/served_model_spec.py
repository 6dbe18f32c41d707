"""A served model's workload: its own vLLM server, serving its checkpoint's adapter only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_plane.controller.workloads import vllm_spec
from control_plane.db.models import Checkpoint, ServedModel
from control_plane.scheduler.protocol import WorkloadRole, WorkloadSpec
from data_plane.sampler.names import adapter_name_for_prefix

if TYPE_CHECKING:
    from control_plane.runtime import Runtime


def served_model_spec(r: Runtime, sm: ServedModel, ckpt: Checkpoint | None, *, port: int | None = None) -> WorkloadSpec:
    """A served model's own vLLM server: the base model plus exactly one adapter, its checkpoint
    (``adapter_key_prefixes`` allows nothing else). Clients reach it through the API server,
    which names the adapter by ``adapter_name_for_prefix(ckpt.storage_prefix)``. Build it once
    per workload and keep it (a local server keeps its port)."""
    default_rank = r.settings.sampler_max_lora_rank
    rank = int((ckpt.lora_config or {}).get("rank") or default_rank) if ckpt is not None else default_rank
    return vllm_spec(
        r,
        workload_id=sm.id,
        role=WorkloadRole.SERVED_MODEL,
        org_id=sm.org_id,
        base_model=sm.base_model,
        adapter_key_prefixes=[adapter_name_for_prefix(ckpt.storage_prefix)] if ckpt is not None else [],
        max_lora_rank=rank,
        max_loras=1,
        port=port,
    )
