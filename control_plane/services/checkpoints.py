"""Checkpoint rows: listing, validation, file listings with download URLs, recording."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.principal import Principal
from control_plane.db.models import Checkpoint, CheckpointFile, Run
from control_plane.errors import InvalidInput, NotFound
from control_plane.ids import new_id
from control_plane.services.scoping import list_scope_filter
from data_plane.wire.paths import CheckpointRef, PathError, parse_checkpoint_path

MAX_PAGE_SIZE = 1000


async def list_checkpoints(
    s: AsyncSession,
    principal: Principal,
    *,
    run_id: str | None,
    base_model: str | None,
    checkpoint_path: str | None,
    scope: str | None = None,
) -> list[Checkpoint]:
    given = [n for n, v in (("run_id", run_id), ("base_model", base_model), ("checkpoint_path", checkpoint_path)) if v]
    if len(given) != 1:
        raise InvalidInput(
            "exactly one of run_id, base_model or checkpoint_path must be given"
            + (f" (got {', '.join(given)})" if given else ""),
            field="run_id" if not given else given[1],
        )
    conds = list_scope_filter(Checkpoint, principal, scope)
    order = (Checkpoint.created_at.desc(), Checkpoint.id.desc())
    if run_id:
        # Tenancy is checked on the run row; the checkpoints are then read by run_id alone
        # (a checkpoint's org and creator are its run's, see record_checkpoint). Filtering
        # on the checkpoint's org and creator as well lets Postgres AND in a bitmap of every
        # checkpoint the caller owns, which grows with the caller's other runs.
        run_conds = list_scope_filter(Run, principal, scope)
        q = select(Checkpoint).join(Run, Run.id == Checkpoint.run_id).where(Checkpoint.run_id == run_id, *run_conds)
        return list((await s.execute(q.order_by(*order))).scalars())
    if base_model:
        conds.append(Checkpoint.base_model == base_model)
    else:
        assert checkpoint_path is not None
        try:
            ref = parse_checkpoint_path(checkpoint_path)
        except PathError as exc:
            raise InvalidInput(str(exc), field="checkpoint_path") from exc
        conds += [Checkpoint.run_id == ref.run_id, Checkpoint.kind == ref.kind, Checkpoint.name == ref.name]
    return list((await s.execute(select(Checkpoint).where(*conds).order_by(*order))).scalars())


async def find_by_ref(s: AsyncSession, org_id: str, ref: CheckpointRef) -> Checkpoint | None:
    q = select(Checkpoint).where(
        Checkpoint.org_id == org_id,
        Checkpoint.run_id == ref.run_id,
        Checkpoint.kind == ref.kind,
        Checkpoint.name == ref.name,
    )
    return (await s.execute(q)).scalar_one_or_none()


async def validate_checkpoint(s: AsyncSession, principal: Principal, checkpoint_path: str) -> Checkpoint:
    if not checkpoint_path.startswith("bt://loops:"):
        raise InvalidInput(
            f"malformed checkpoint path {checkpoint_path!r}: expected bt://loops:<run_id>/sampler_weights/<name>",
            field="checkpoint_path",
        )
    try:
        ref = parse_checkpoint_path(checkpoint_path)
    except PathError as exc:
        raise InvalidInput(str(exc), field="checkpoint_path") from exc
    if ref.kind != "sampler_weights":
        raise InvalidInput(
            f"{checkpoint_path!r} is a {ref.kind} checkpoint; only sampler_weights can be validated",
            field="checkpoint_path",
        )
    ckpt = await find_by_ref(s, principal.org_id, ref)
    if ckpt is None:
        raise InvalidInput(
            f"checkpoint {checkpoint_path!r} does not exist or is not accessible", field="checkpoint_path"
        )
    return ckpt


async def get_checkpoint(s: AsyncSession, principal: Principal, checkpoint_id: str) -> Checkpoint:
    ckpt = await s.get(Checkpoint, checkpoint_id)
    if ckpt is None or ckpt.org_id != principal.org_id:
        raise NotFound("checkpoint", checkpoint_id)
    return ckpt


@dataclass(frozen=True)
class FilePage:
    files: list[dict[str, Any]]
    total_count: int
    next_page_token: int | None


async def checkpoint_files(
    s: AsyncSession,
    ckpt: Checkpoint,
    *,
    page_size: int,
    page_token: int,
    url_for: Callable[[str], str],
) -> FilePage:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInput(f"page_size must be between 1 and {MAX_PAGE_SIZE}", field="page_size")
    if page_token < 0:
        raise InvalidInput("page_token must be a non-negative offset", field="page_token")
    total = (
        await s.execute(select(func.count()).select_from(CheckpointFile).where(CheckpointFile.checkpoint_id == ckpt.id))
    ).scalar_one()
    rows = (
        await s.execute(
            select(CheckpointFile)
            .where(CheckpointFile.checkpoint_id == ckpt.id)
            .order_by(CheckpointFile.relative_path)
            .offset(page_token)
            .limit(page_size)
        )
    ).scalars()
    files = [
        {
            "url": url_for(f"{ckpt.storage_prefix}/{f.relative_path}"),
            "relative_file_name": f.relative_path,
            "node_rank": f.node_rank,
            "size_bytes": f.size_bytes,
            "last_modified": f.last_modified,
        }
        for f in rows
    ]
    nxt = page_token + len(files)
    return FilePage(files, total, nxt if nxt < total else None)


async def record_checkpoint(
    s: AsyncSession,
    run: Run,
    *,
    kind: str,
    name: str,
    storage_prefix: str,
    files: list[tuple[str, int]],
    lora_config: dict[str, Any] | None,
    user_metadata: dict[str, Any] | None = None,
    ttl_seconds: int | None = None,
    policy_version: int | None = None,
) -> Checkpoint:
    """Insert (or replace, for overwrite) the row that makes a written checkpoint visible."""
    old = (
        await s.execute(
            select(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.kind == kind, Checkpoint.name == name)
        )
    ).scalar_one_or_none()
    if old is not None:
        await s.execute(delete(Checkpoint).where(Checkpoint.id == old.id))
    now = datetime.now(UTC)
    ckpt = Checkpoint(
        id=new_id("ckpt"),
        org_id=run.org_id,
        created_by=run.created_by,
        run_id=run.id,
        kind=kind,
        name=name,
        base_model=run.base_model,
        storage_prefix=storage_prefix,
        size_bytes=sum(size for _, size in files),
        lora_config=lora_config,
        user_metadata=dict(user_metadata or {}),
        sync_status="COMPLETE",
        policy_version=policy_version,
        expires_at=now + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
        created_at=now,
    )
    s.add(ckpt)
    await s.flush()
    for rel, size in files:
        s.add(CheckpointFile(checkpoint_id=ckpt.id, relative_path=rel, size_bytes=size, last_modified=now))
    await s.flush()
    return ckpt
