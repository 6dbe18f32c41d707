"""What the live-server tests read about a run (rows, history, Redis state, its trainer
process), how they wait for it, and how they make a tenant of their own."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from control_plane.db.models import Run, StatusHistory
from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.services import identity
from data_plane.wire import queue as q
from tests.infra.live_server import LiveServer, start_live_server

History = list[tuple[str | None, str, str | None]]  # (from, to, reason), oldest first


def start_durable_server(
    services: Any, live_model: Any, data_dir: Any, *, redis_db: int, **overrides: Any
) -> LiveServer:
    """A live server of a test module's own whose trainers snapshot every 3 ops (never by
    time): a resume restores a snapshot and replays the ops logged after it. ``overrides``:
    more settings."""
    return start_live_server(
        services.database_url,
        services.redis_url,
        data_dir,
        live_model,
        redis_db=redis_db,
        trainer_snapshot_max_ops=3,
        trainer_snapshot_interval_seconds=3600.0,
        **overrides,
    )


def in_transaction(server: LiveServer, fn: Callable[[Any], Any]) -> Any:
    """``await fn(session)`` in a transaction on the server's loop."""

    async def go() -> Any:
        async with server.runtime.db.transaction() as s:
            return await fn(s)

    return server.call(go())


def run_row(server: LiveServer, run_id: str) -> Run:
    return in_transaction(server, lambda s: s.get(Run, run_id))


def history(server: LiveServer, kind: str, rid: str) -> History:
    async def rows(s: Any) -> History:
        stmt = (
            select(StatusHistory)
            .where(StatusHistory.resource_type == kind, StatusHistory.resource_id == rid)
            .order_by(StatusHistory.id)
        )
        return [(h.from_status, h.to_status, h.reason) for h in (await s.execute(stmt)).scalars()]

    return in_transaction(server, rows)


def run_state(server: LiveServer, run_id: str) -> dict[str, str]:
    """What the run's trainer reports about it (``next_seq``, ``resumes``, ``snapshot_seq``...)."""
    raw = server.call(server.runtime.redis.hgetall(q.run_state_key(run_id)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def pending(server: LiveServer, run_id: str) -> set[str]:
    """Request ids of the run's ops that are submitted and not answered."""
    return {m.decode() for m in server.call(server.runtime.redis.smembers(q.run_pending_key(run_id)))}


def trainer_pid(server: LiveServer, run_id: str, timeout_s: float = 120.0) -> int:
    """The pid of the run's trainer process (waits while there is none, e.g. during a restart)."""
    backend = server.runtime.backend
    assert isinstance(backend, LocalProcessBackend)
    dep_id = run_row(server, run_id).deployment_id
    assert dep_id is not None
    deadline = time.monotonic() + timeout_s
    while (pid := backend.pid(dep_id, WorkloadRole.TRAINER)) is None:
        assert time.monotonic() < deadline, "no trainer process"
        time.sleep(0.05)
    return pid


def wait_status(server: LiveServer, run_id: str, *statuses: str, timeout_s: float = 180.0) -> str:
    """Until the run has one of ``statuses``; returns it."""
    deadline = time.monotonic() + timeout_s
    while (st := run_row(server, run_id).status) not in statuses:
        assert time.monotonic() < deadline, (st, history(server, "run", run_id))
        time.sleep(0.1)
    return st


def rank_pids(trainer_pid: int, world: int, timeout_s: float = 120.0) -> dict[int, int]:
    """{rank: pid} of the ranks a torchrun trainer process started (waits until all ``world``
    run): its child processes, each named by the ``RANK`` in its environment."""
    deadline = time.monotonic() + timeout_s
    while True:
        found: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue  # gone, or not ours
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != trainer_pid:
                continue
            for var in environ:
                if var.startswith(b"RANK="):
                    found[int(var[5:])] = int(entry.name)
        if len(found) == world:
            return found
        assert time.monotonic() < deadline, f"torchrun {trainer_pid} runs ranks {sorted(found)}, not {world}"
        time.sleep(0.05)


def new_tenant(server: LiveServer, name: str, scopes: list[str] | None = None, org_id: str | None = None) -> str:
    """An API key (of a new org, or a new user of ``org_id``) with ``scopes``."""

    async def go() -> str:
        async with server.runtime.db.transaction() as s:
            org = await identity.get_org(s, org_id) if org_id else await identity.create_org(s, name)
            user = await identity.create_user(s, org, f"{name}@example.com")
            return (await identity.create_api_key(s, user, scopes=scopes)).plaintext

    return server.call(go())
