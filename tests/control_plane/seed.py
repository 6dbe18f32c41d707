"""Rows that the Loops API cannot create by itself (checkpoints come from trainers, served
models from the admin CLI), created through the same services."""

from __future__ import annotations

from control_plane.runtime import Runtime
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import runs as runs_svc
from control_plane.services import served_models as sm_svc


async def add_checkpoint(runtime: Runtime, tenant, run_id: str, name: str, kind: str = "sampler_weights", files=None):
    files = files or [("adapter_config.json", 12), ("adapter_model.safetensors", 34)]
    prefix = f"ckpt/{tenant.org_id}/{run_id}/{kind}/{name}/v1"
    for rel, size in files:
        runtime.store.put_bytes(f"{prefix}/{rel}", b"x" * size)
    async with runtime.db.transaction() as s:
        run = await runs_svc.get_run(s, tenant.principal, run_id)
        return await ckpt_svc.record_checkpoint(
            s, run, kind=kind, name=name, storage_prefix=prefix, files=files, lora_config={"r": 8}
        )


async def add_served_model(runtime: Runtime, tenant, *checkpoints, name: str = "served"):
    async with runtime.db.transaction() as s:
        served = await sm_svc.deploy(
            s, tenant.principal, runtime.catalog, checkpoint_ids=[c.id for c in checkpoints], model_name=name
        )
    return served.model
