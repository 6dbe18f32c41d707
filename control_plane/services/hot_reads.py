"""The two reads a training loop polls most — a run (with its paired sampler and creator) and a
run's checkpoints — each answered by one prepared statement on the asyncpg read pool
(:mod:`control_plane.db.reader`). Same results and tenancy rules as ``runs.get_run`` +
``runs.paired_sampler`` + ``presenters.principal_names`` and ``checkpoints.list_checkpoints``
for ``run_id``; the tests compare the two paths."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, bindparam, select, true

from control_plane.auth.principal import Principal
from control_plane.db.models import Checkpoint, Run, Sampler, ServiceAccount, User
from control_plane.db.reader import Prepared, Reader, Row
from control_plane.errors import NotFound
from control_plane.services.scoping import own_only

SAMPLER_PREFIX = "smp__"

_paired = (
    select(Sampler)
    .where(Sampler.run_id == Run.id, Sampler.model_path.is_(None))
    .order_by(Sampler.created_at.desc(), Sampler.id.desc())
    .limit(1)
    .lateral("paired")
)

_GET_RUN = Prepared.of(
    select(
        Run.__table__,
        *[c.label(SAMPLER_PREFIX + c.name) for c in _paired.c],
        User.email.label("creator_email"),
        ServiceAccount.name.label("creator_sa_name"),
    )
    .select_from(Run)
    .outerjoin(_paired, true())
    .outerjoin(User, User.id == Run.created_by)
    .outerjoin(ServiceAccount, ServiceAccount.id == Run.created_by)
    .where(Run.id == bindparam("run_id"), Run.org_id == bindparam("org_id"))
)


def _run_checkpoints(own_only: bool) -> Prepared:
    # tenancy is checked on the run row, the checkpoints read by run_id alone (see
    # checkpoints.list_checkpoints for why)
    run_conds = [Run.org_id == bindparam("org_id")]
    if own_only:
        run_conds.append(Run.created_by == bindparam("principal_id"))
    return Prepared.of(
        select(Checkpoint.__table__)
        .join(Run, and_(Run.id == Checkpoint.run_id, *run_conds))
        .where(Checkpoint.run_id == bindparam("run_id"))
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
    )


_RUN_CHECKPOINTS = {True: _run_checkpoints(True), False: _run_checkpoints(False)}


@dataclass(frozen=True, slots=True)
class RunView:
    run: Row
    sampler: Row | None
    creator_email: str | None  # the run's creator is a user ...
    creator_service_account: str | None  # ... or a service account (both None: row gone)


async def get_run(reader: Reader, principal: Principal, run_id: str) -> RunView:
    rec = await reader.one(_GET_RUN, run_id=run_id, org_id=principal.org_id)
    if rec is None:
        raise NotFound("run", run_id)
    sampler = Row(rec, SAMPLER_PREFIX) if rec[SAMPLER_PREFIX + "id"] is not None else None
    return RunView(Row(rec), sampler, rec["creator_email"], rec["creator_sa_name"])


async def run_checkpoints(reader: Reader, principal: Principal, run_id: str, scope: str | None) -> list[Row]:
    own = own_only(scope)
    values = {"run_id": run_id, "org_id": principal.org_id}
    if own:
        values["principal_id"] = principal.principal_id
    return [Row(r) for r in await reader.all(_RUN_CHECKPOINTS[own], **values)]
