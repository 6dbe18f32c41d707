"""Import a PEFT LoRA adapter directory as an org's ``sampler_weights`` checkpoint.

An imported checkpoint belongs to an *import run*: a run row (origin ``import``, INACTIVE from
the start, no trainer ever) in a finished session of its own, so that the checkpoint has the
usual paths (``tinker://{run_id}/sampler_weights/{name}``, ``bt://loops:{run_id}/...``) and
everything that takes a checkpoint takes it: listing, download URLs, deletion, a Loops run's
``base_checkpoint``, deploying it as a served model. Its LoRA settings are read from the
adapter, which is checked first (:mod:`data_plane.wire.peft_adapter`: no torch here).

Files are uploaded before the rows that make them visible are committed; on any failure the
uploaded files are removed again, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from control_plane.auth.principal import Principal
from control_plane.catalog import CatalogModel, ModelCatalog
from control_plane.db.engine import Database
from control_plane.db.models import Checkpoint, Run
from control_plane.errors import InvalidInput
from control_plane.ids import new_id
from control_plane.services import history
from control_plane.services.checkpoints import record_checkpoint
from control_plane.services.runs import MAX_LORA_RANK
from control_plane.services.sessions import create_session
from control_plane.statuses import SessionStatus, Status
from data_plane.storage.base import ObjectStore
from data_plane.wire import peft_adapter as pa
from data_plane.wire.paths import PathError, validate_name

ORIGIN = "import"
DEFAULT_NAME = "imported"
IMPORT_REASON = "imported adapter: holds its checkpoint, runs nothing"


@dataclass(frozen=True)
class Imported:
    run: Run
    checkpoint: Checkpoint
    adapter: pa.AdapterInfo


def base_shapes(model: CatalogModel) -> pa.BaseShapes | None:
    """The base model's layer shapes, when its weights are a local directory with a
    ``config.json`` (else only the adapter's own consistency is checked)."""
    cfg = Path(model.source) / "config.json"
    try:
        return pa.BaseShapes.from_config(json.loads(cfg.read_text()))
    except (OSError, ValueError):
        return None


def check_adapter(directory: Path, catalog: ModelCatalog, base_model: str) -> tuple[CatalogModel, pa.AdapterInfo]:
    """The catalog model and the adapter's settings; a 400 naming the problem otherwise."""
    model = catalog.get(base_model, field="base_model")
    missing = [f for f in pa.ADAPTER_FILES if not (directory / f).is_file()]
    if missing:
        raise InvalidInput(
            f"the adapter has no {' and no '.join(missing)}: a PEFT adapter directory holds "
            f"{pa.CONFIG_FILE} and {pa.WEIGHTS_FILE}",
            field="adapter",
        )
    cfg_path = directory / pa.CONFIG_FILE
    if cfg_path.stat().st_size > pa.MAX_CONFIG_BYTES:
        raise InvalidInput(f"{pa.CONFIG_FILE} is larger than {pa.MAX_CONFIG_BYTES} bytes", field="adapter")
    try:
        info = pa.inspect_adapter(
            cfg_path.read_bytes(), directory / pa.WEIGHTS_FILE, max_rank=MAX_LORA_RANK, base=base_shapes(model)
        )
    except pa.AdapterError as exc:
        raise InvalidInput(f"not an adapter for {model.name}: {exc}", field="adapter") from exc
    return model, info


def _prefix(org_id: str, run_id: str, name: str) -> str:
    # the layout of trainer-written checkpoints (control_plane.training.ops.storage_prefix)
    return f"checkpoints/{org_id}/{run_id}/sampler_weights/{name}-{secrets.token_hex(4)}"


def _upload(store: ObjectStore, prefix: str, config: bytes, weights: Path) -> list[tuple[str, int]]:
    store.put_file(f"{prefix}/{pa.WEIGHTS_FILE}", weights)
    store.put_bytes(f"{prefix}/{pa.CONFIG_FILE}", config)
    return [(pa.CONFIG_FILE, len(config)), (pa.WEIGHTS_FILE, weights.stat().st_size)]


async def import_adapter(
    db: Database,
    store: ObjectStore,
    catalog: ModelCatalog,
    principal: Principal,
    *,
    directory: Path,
    base_model: str,
    name: str | None = None,
) -> Imported:
    """Check the adapter in ``directory``, store it and record it (see the module docstring)."""
    name = name or DEFAULT_NAME
    try:
        validate_name(name)
    except PathError as exc:
        raise InvalidInput(str(exc), field="name") from exc
    model, info = await asyncio.to_thread(check_adapter, directory, catalog, base_model)
    run_id = new_id(ORIGIN)
    prefix = _prefix(principal.org_id, run_id, name)
    config = pa.normalized_config(info.config, model.name)
    try:
        files = await asyncio.to_thread(_upload, store, prefix, config, directory / pa.WEIGHTS_FILE)
        async with db.transaction() as s:
            session = await create_session(s, principal, origin=ORIGIN, display_name=f"import {name}")
            now = datetime.now(UTC)
            session.status = SessionStatus.FINISHED.value
            session.finished_at = now
            run = Run(
                id=run_id,
                org_id=principal.org_id,
                created_by=principal.principal_id,
                session_id=session.id,
                origin=ORIGIN,
                name=name,
                base_model=model.name,
                status=Status.INACTIVE.value,
                status_reason=IMPORT_REASON,
                lora_rank=info.rank,
                lora_config=info.lora_config(),
                max_seq_len=model.max_context_length,
                scale_down_delay_seconds=1,
                user_metadata={},
                last_request_at=now,
                created_at=now,
                updated_at=now,
                deactivated_at=now,
            )
            s.add(run)
            history.initial(s, "run", run, IMPORT_REASON)
            await s.flush()
            ckpt = await record_checkpoint(
                s,
                run,
                kind="sampler_weights",
                name=name,
                storage_prefix=prefix,
                files=files,
                lora_config=info.lora_config(),
            )
    except BaseException:
        await asyncio.shield(asyncio.to_thread(store.delete_prefix, prefix + "/"))
        raise
    return Imported(run, ckpt, info)
