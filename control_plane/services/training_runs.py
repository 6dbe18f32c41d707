"""Training runs and their checkpoints as the Tinker REST API lists them (offset pages with a
total count), plus checkpoint deletion and TTL changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.db.models import Checkpoint, CheckpointFile, Run, Session
from control_plane.errors import InvalidInput, NotFound
from control_plane.services import served_models
from control_plane.services.checkpoints import find_by_ref
from control_plane.services.runs import get_run
from control_plane.services.scoping import list_scope_filter
from data_plane.storage.base import ObjectStore
from data_plane.wire.paths import KINDS, CheckpointRef, PathError, parse_checkpoint_path, validate_name


@dataclass(frozen=True)
class RunPage:
    runs: list[tuple[Run, Checkpoint | None, Checkpoint | None]]
    total: int


async def _last_of_runs(s: AsyncSession, run_ids: list[str]) -> dict[tuple[str, str], Checkpoint]:
    """The newest checkpoint of each kind for many runs in one query (DISTINCT ON)."""
    if not run_ids:
        return {}
    q = (
        select(Checkpoint)
        .where(Checkpoint.run_id.in_(run_ids))
        .distinct(Checkpoint.run_id, Checkpoint.kind)
        .order_by(Checkpoint.run_id, Checkpoint.kind, Checkpoint.created_at.desc(), Checkpoint.id.desc())
    )
    return {(c.run_id, c.kind): c for c in (await s.execute(q)).scalars()}


async def list_training_runs(
    s: AsyncSession,
    principal: Principal,
    *,
    limit: int,
    offset: int,
    scope: str | None,
    project_id: str | None = None,
) -> RunPage:
    conds = list_scope_filter(Run, principal, scope)
    if project_id is not None:
        conds.append(Run.session_id.in_(select(Session.id).where(Session.training_project_id == project_id)))
    total = (await s.execute(select(func.count()).select_from(Run).where(*conds))).scalar_one()
    q = select(Run).where(*conds).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit).offset(offset)
    rows = list((await s.execute(q)).scalars())
    return RunPage(await with_last_checkpoints(s, rows), int(total))


async def with_last_checkpoints(
    s: AsyncSession, runs: list[Run]
) -> list[tuple[Run, Checkpoint | None, Checkpoint | None]]:
    """Each run with its newest ``weights`` and ``sampler_weights`` checkpoint."""
    last = await _last_of_runs(s, [r.id for r in runs])
    return [(r, last.get((r.id, "weights")), last.get((r.id, "sampler_weights"))) for r in runs]


async def list_run_checkpoints(s: AsyncSession, principal: Principal, run_id: str) -> list[Checkpoint]:
    run = await get_run(s, principal, run_id)
    q = (
        select(Checkpoint)
        .where(Checkpoint.run_id == run.id)
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
    )
    return list((await s.execute(q)).scalars())


async def list_all_checkpoints(
    s: AsyncSession, principal: Principal, *, limit: int, offset: int, scope: str | None
) -> tuple[list[Checkpoint], int]:
    conds = list_scope_filter(Checkpoint, principal, scope)
    total = (await s.execute(select(func.count()).select_from(Checkpoint).where(*conds))).scalar_one()
    q = (
        select(Checkpoint)
        .where(*conds)
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list((await s.execute(q)).scalars()), int(total)


async def find_run_checkpoint(s: AsyncSession, principal: Principal, run_id: str, checkpoint_id: str) -> Checkpoint:
    """``checkpoint_id`` is Tinker's ``{kind}/{name}``."""
    kind, _, name = checkpoint_id.partition("/")
    if kind not in KINDS or not name:
        raise InvalidInput(
            f"checkpoint id {checkpoint_id!r} must look like weights/<name>, sampler_weights/<name> "
            "or external_weights/<name>",
            field="checkpoint_id",
        )
    try:
        validate_name(name)
    except PathError as exc:
        raise InvalidInput(str(exc), field="checkpoint_id") from exc
    return await _find(s, principal, CheckpointRef(run_id, kind, name))


async def checkpoint_by_path(s: AsyncSession, principal: Principal, path: str) -> Checkpoint:
    try:
        ref = parse_checkpoint_path(path)
    except PathError as exc:
        raise InvalidInput(str(exc), field="tinker_path") from exc
    return await _find(s, principal, ref)


async def _find(s: AsyncSession, principal: Principal, ref: CheckpointRef) -> Checkpoint:
    run = await get_run(s, principal, ref.run_id)  # 404 for an unknown or another org's run
    ckpt = await find_by_ref(s, run.org_id, ref)
    if ckpt is None:
        raise NotFound("checkpoint", ref.tinker_path)
    return ckpt


async def delete_checkpoint_row(s: AsyncSession, ckpt: Checkpoint) -> str:
    """Delete the row (nothing lists or loads it any more); returns the files' prefix, to be
    removed with :func:`delete_checkpoint_files` once the transaction has committed. A
    checkpoint a live served model serves is refused (409) until that model is deactivated."""
    served_models.refuse_delete_if_served(ckpt.id, await served_models.live_served_models_of_checkpoint(s, ckpt.id))
    prefix = ckpt.storage_prefix
    await s.execute(delete(Checkpoint).where(Checkpoint.id == ckpt.id))
    await s.flush()
    return prefix


async def delete_checkpoint_files(store: ObjectStore, prefix: str) -> int:
    if not prefix:
        return 0
    return await asyncio.to_thread(store.delete_prefix, prefix.rstrip("/") + "/")


def set_ttl(ckpt: Checkpoint, ttl_seconds: int | None, max_ttl: int) -> None:
    if ttl_seconds is None:
        ckpt.expires_at = None
        return
    if not 1 <= ttl_seconds <= max_ttl:
        raise InvalidInput(f"ttl_seconds must be between 1 and {max_ttl}, or null", field="ttl_seconds")
    ckpt.expires_at = datetime.now(UTC) + timedelta(seconds=ttl_seconds)


async def file_urls(s: AsyncSession, ckpt: Checkpoint, url_for: Callable[[str], str]) -> dict[str, str]:
    """A download URL for every file of ``ckpt``, keyed by its path relative to the checkpoint."""
    rows = (
        await s.execute(
            select(CheckpointFile.relative_path)
            .where(CheckpointFile.checkpoint_id == ckpt.id)
            .order_by(CheckpointFile.relative_path)
        )
    ).scalars()
    return {rel: url_for(f"{ckpt.storage_prefix}/{rel}") for rel in rows}
