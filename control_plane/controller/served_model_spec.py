"""A served model's workload: its own vLLM server, serving its checkpoints' adapters only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.controller.workloads import vllm_spec
from control_plane.db.models import Checkpoint, ServedModel, ServedModelCheckpoint
from control_plane.scheduler.protocol import WorkloadRole, WorkloadSpec

if TYPE_CHECKING:
    from control_plane.runtime import Runtime


async def adapters_of(s: AsyncSession, served_model_id: str) -> list[tuple[str, int | None]]:
    """The vLLM adapter names of a served model's checkpoints, with their LoRA ranks."""
    q = (
        select(ServedModelCheckpoint.adapter_name, Checkpoint.lora_config)
        .join(Checkpoint, Checkpoint.id == ServedModelCheckpoint.checkpoint_id)
        .where(ServedModelCheckpoint.served_model_id == served_model_id)
        .order_by(ServedModelCheckpoint.position)
    )
    out: list[tuple[str, int | None]] = []
    for name, cfg in (await s.execute(q)).all():
        rank = (cfg or {}).get("rank")
        out.append((name, int(rank) if rank else None))
    return out


def served_model_spec(
    r: Runtime, sm: ServedModel, adapters: list[tuple[str, int | None]], *, port: int | None = None
) -> WorkloadSpec:
    """A served model's own vLLM server: the base model plus exactly its checkpoints' adapters
    (``adapter_key_prefixes`` allows nothing else), all loaded at once (``max_loras``). Clients
    reach it through the API server, which maps a checkpoint's name to its adapter name. Build
    it once per workload and keep it (a local server keeps its port)."""
    default_rank = r.settings.sampler_max_lora_rank
    rank = max([x for _, x in adapters if x] or [default_rank])
    return vllm_spec(
        r,
        workload_id=sm.id,
        role=WorkloadRole.SERVED_MODEL,
        org_id=sm.org_id,
        base_model=sm.base_model,
        adapter_key_prefixes=[name for name, _ in adapters],
        max_lora_rank=rank,
        max_loras=max(1, len(adapters)),
        port=port,
        hf_secret=sm.hf_secret_name,
    )
