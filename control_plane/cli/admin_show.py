"""``openloops admin {runs,samplers,deployments,served-models} show ID``: the row, its workload as the
scheduler backend observes it (phase, reason, endpoint; Kubernetes objects, pods and events,
or the local process and its log) and its recent status history."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from rich.table import Table
from sqlalchemy import inspect, select

from control_plane.cli.context import console
from control_plane.db.engine import Database
from control_plane.db.models import Org, Run, Sampler, StatusHistory
from control_plane.errors import NotFound
from control_plane.runtime import build_backend
from control_plane.scaling.kinds import DEPLOYMENT, kind_of
from control_plane.services.samplers import sampler_workload_id
from control_plane.settings import Settings


def _plain(v: Any) -> Any:
    return v.isoformat() if isinstance(v, datetime) else v


def _columns(row: Any) -> dict[str, Any]:
    return {a.key: _plain(getattr(row, a.key)) for a in inspect(row).mapper.column_attrs}


async def gather(
    db: Database, settings: Settings, kind_name: str, rid: str, *, org: str | None, history: int, events: int
) -> dict[str, Any]:
    kind = kind_of(kind_name)
    async with db.session() as s:
        row = await kind.get(s, rid)
        if row is not None and org is not None:
            o = await s.get(Org, row.org_id)
            if o is None or org not in (o.id, o.name):
                row = None
        if row is None:
            raise NotFound(kind.name, rid)
        hist = list(
            (
                await s.execute(
                    select(StatusHistory)
                    .where(StatusHistory.resource_type == kind.name, StatusHistory.resource_id == rid)
                    .order_by(StatusHistory.id.desc())
                    .limit(history)
                )
            ).scalars()
        )
    # a sampler row is served by the shared vLLM workload of its base model; a run executes
    # on its deployment's trainer
    workload_id: str | None
    if isinstance(row, Sampler):
        workload_id, role = sampler_workload_id(row.base_model), kind.owned_role
    elif isinstance(row, Run):
        workload_id, role = row.deployment_id, DEPLOYMENT.owned_role
    else:
        workload_id, role = row.id, kind.owned_role
    return {
        kind.name: _columns(row),
        "workload": await _workload(settings, workload_id, role, events) if workload_id else None,
        "history": [
            {"at": _plain(h.created_at), "from": h.from_status, "to": h.to_status, "reason": h.reason}
            for h in reversed(hist)
        ],
    }


async def _workload(settings: Settings, workload_id: str, role: Any, events: int) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": settings.backend.value, "workload_id": workload_id, "role": role.value}
    try:
        backend = build_backend(settings, None)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - misconfigured backend: show the row anyway
        return {**out, "error": f"cannot reach the scheduler backend: {exc}"}
    try:
        d = await backend.describe(workload_id, role, max_events=events)
    except Exception as exc:  # noqa: BLE001 - the API server is down: show the row anyway
        return {**out, "error": f"cannot describe the workload: {exc}"}
    finally:
        with contextlib.suppress(Exception):
            await backend.close()
    o = d.observation
    return {
        **out,
        "phase": o.phase.value,
        "reason": o.reason,
        "endpoint": o.endpoint,
        "exit_code": o.exit_code,
        "details": d.details,
        "events": [
            {
                "time": e.time,
                "type": e.type,
                "reason": e.reason,
                "object": e.object,
                "message": e.message,
                "count": e.count,
            }
            for e in d.events
        ],
    }


def render(kind_name: str, data: dict[str, Any]) -> None:
    row = data[kind_name]
    console.print(f"[bold]{kind_name} {row['id']}[/bold]")
    for k, v in row.items():
        if v not in (None, {}, []):
            console.print(f"  [bold]{k}[/bold]: {v}")
    w = data["workload"]
    if w is None:
        console.print("[dim](no workload)[/dim]")
    elif "error" in w:
        console.print(f"[bold]workload[/bold] {w['role']}/{w['workload_id']} ({w['backend']} backend)")
        console.print(f"  [red]{w['error']}[/red]")
    else:
        console.print(f"[bold]workload[/bold] {w['role']}/{w['workload_id']} ({w['backend']} backend)")
        for k in ("phase", "reason", "endpoint", "exit_code"):
            if w.get(k) is not None:
                console.print(f"  [bold]{k}[/bold]: {w[k]}")
        for k, v in (w.get("details") or {}).items():
            if k == "pods":
                for p in v:
                    console.print(
                        f"  [bold]pod[/bold]: {p['name']} phase={p['phase']} ready={p['ready']} "
                        f"restarts={p['restarts']} node={p['node']}"
                    )
            elif v is not None:
                console.print(f"  [bold]{k}[/bold]: {v}")
        _table("events", ["time", "type", "reason", "object", "message"], w.get("events") or [])
    _table("status history", ["at", "from", "to", "reason"], data["history"])


def _table(title: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print(f"[dim]({title}: none)[/dim]")
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if r.get(c) is None else str(r.get(c)) for c in columns])
    console.print(t)
