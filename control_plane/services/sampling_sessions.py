"""Tinker sampling sessions: one Sampler row per ``{session_id}:sample:{seq_id}``.

A sampling session serves either a base model or one checkpoint (a ``sampler_weights`` or a
``weights`` checkpoint: both hold the PEFT adapter files vLLM loads). The row pins the
checkpoint by id, so a client created for one snapshot keeps sampling that snapshot while
training goes on. The vLLM workload itself is shared per base model (see
:mod:`control_plane.controller.samplers`); the row only says what this session serves.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Checkpoint, Sampler
from control_plane.errors import Conflict
from control_plane.ids import sampling_session_id
from control_plane.services import history
from control_plane.statuses import Status


def checkpoint_tinker_path(ckpt: Checkpoint) -> str:
    return f"tinker://{ckpt.run_id}/{ckpt.kind}/{ckpt.name}"


async def open_sampling_session(
    s: AsyncSession,
    *,
    org_id: str,
    created_by: str,
    session_id: str,
    seq_id: int,
    base_model: str,
    checkpoint: Checkpoint | None,
    asleep_because: str | None = None,
) -> Sampler:
    """Create (or return, when it already exists with the same target) the Sampler row of one
    Tinker sampling session, with its initial history row. The row starts in DEPLOYING; the
    controller moves it as the shared vLLM server of ``base_model`` comes up.

    With ``asleep_because`` the row starts SCALED_TO_ZERO with that reason instead (the org
    had no capacity for another sampler server; the first request wakes it, or answers 429
    while there is still none).

    Idempotent on the id: a repeated call with the same target returns the existing row; a
    call that reuses the id for a different target raises :class:`Conflict`."""
    sid = sampling_session_id(session_id, seq_id)
    if checkpoint is not None and checkpoint.base_model != base_model:
        raise Conflict(
            f"checkpoint {checkpoint_tinker_path(checkpoint)} belongs to {checkpoint.base_model}, not {base_model}"
        )
    want_ckpt = checkpoint.id if checkpoint is not None else None
    now = datetime.now(UTC)
    values = dict(
        id=sid,
        org_id=org_id,
        created_by=created_by,
        session_id=session_id,
        run_id=None,  # not paired with a run: deactivating a run leaves its checkpoints sampleable
        origin="tinker",
        base_model=base_model,
        model_path=checkpoint_tinker_path(checkpoint) if checkpoint is not None else None,
        checkpoint_id=want_ckpt,
        max_seq_length=None,
        status=(Status.SCALED_TO_ZERO if asleep_because else Status.DEPLOYING).value,
        status_reason=asleep_because,
        created_at=now,
        updated_at=now,
    )
    # ON CONFLICT DO NOTHING: concurrent retries of the same call race safely
    inserted = (
        await s.execute(
            pg_insert(Sampler).values(**values).on_conflict_do_nothing(index_elements=["id"]).returning(Sampler.id)
        )
    ).scalar_one_or_none()
    smp = (
        await s.execute(select(Sampler).where(Sampler.id == sid).execution_options(populate_existing=True))
    ).scalar_one()
    if inserted is None:
        if smp.org_id != org_id or smp.checkpoint_id != want_ckpt or smp.base_model != base_model:
            raise Conflict(f"sampling session {sid!r} already exists for a different model or checkpoint")
        return smp
    history.initial(s, "sampler", smp, asleep_because or "sampling session created")
    await s.flush()
    return smp
