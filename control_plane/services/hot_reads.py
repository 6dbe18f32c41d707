"""The two reads a training loop polls most — a run (with its paired sampler and creator) and a
run's checkpoints — each answered by one prepared statement on the asyncpg read pool
(:mod:`control_plane.db.reader`), through the process's read cache
(:mod:`control_plane.db.read_cache`: entries per run and tenant, dropped by any write to the
run, its samplers or checkpoints). Same results and tenancy rules as ``runs.get_run`` +
``runs.paired_sampler`` + ``presenters.principal_names`` and ``checkpoints.list_checkpoints``
for ``run_id``; the tests compare the paths."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import and_, bindparam, select, true

from control_plane.auth.principal import Principal
from control_plane.db.engine import Database
from control_plane.db.models import Checkpoint, Run, Sampler, ServiceAccount, User
from control_plane.db.reader import Prepared, Row
from control_plane.errors import NotFound
from control_plane.services.scoping import own_only

SAMPLER_PREFIX = "smp__"
T = TypeVar("T")

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


async def get_run(
    db: Database,
    principal: Principal,
    run_id: str,
    present: Callable[[RunView], T] | None = None,
    present_key: Hashable = None,
) -> Any:
    """The run's view, or ``present(view)`` — cached as presented, under ``present_key`` (so a
    route can keep its encoded answer; ``present`` must depend on nothing but the view and
    ``present_key``)."""

    async def load() -> Any:
        rec = await db.reader.one(_GET_RUN, run_id=run_id, org_id=principal.org_id)
        if rec is None:
            return None
        sampler = Row(rec, SAMPLER_PREFIX) if rec[SAMPLER_PREFIX + "id"] is not None else None
        view = RunView(Row(rec), sampler, rec["creator_email"], rec["creator_sa_name"])
        return view if present is None else present(view)

    # keyed by tenant: another org's principal never sees this org's entry; a miss (None) is
    # cached too (its INSERT would drop it), so probing unknown ids costs no query either
    got = await db.read_cache.get_or_load(run_id, ("run", principal.org_id, present_key), load)
    if got is None:
        raise NotFound("run", run_id)
    return got


async def run_checkpoints(
    db: Database,
    principal: Principal,
    run_id: str,
    scope: str | None,
    present: Callable[[tuple[Row, ...]], T] | None = None,
    present_key: Hashable = None,
) -> Any:
    """The run's checkpoints, newest first (or ``present`` of them, as in :func:`get_run`)."""
    own = own_only(scope)
    values = {"run_id": run_id, "org_id": principal.org_id}
    if own:
        values["principal_id"] = principal.principal_id

    async def load() -> Any:
        rows = tuple(Row(r) for r in await db.reader.all(_RUN_CHECKPOINTS[own], **values))
        return rows if present is None else present(rows)

    key = ("checkpoints", principal.org_id, principal.principal_id if own else None, present_key)
    return await db.read_cache.get_or_load(run_id, key, load)
