"""EXPLAIN ANALYZE of the exact SQL a service call issues (captured from the engine), summed
up as the plans' scan nodes and Postgres' execution time."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import event

from bench.seed import Tenant
from control_plane.auth.principal import Principal
from control_plane.db.engine import Database
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import runs as runs_svc
from control_plane.services import training_runs as tr_svc
from control_plane.statuses import ALL_SCOPES


async def _call(db: Database, principal: Principal, call: str, kwargs: dict[str, Any]) -> None:
    async with db.session() as s:
        if call == "checkpoints":
            await ckpt_svc.list_checkpoints(s, principal, **kwargs)
        elif call == "files":
            ckpt = await ckpt_svc.get_checkpoint(s, principal, kwargs["checkpoint_id"])
            await ckpt_svc.checkpoint_files(s, ckpt, page_size=2, page_token=0, url_for=str)
        elif call == "runs":
            await runs_svc.list_runs(s, principal, **kwargs)
        elif call == "tinker_checkpoints":
            await tr_svc.list_all_checkpoints(s, principal, limit=20, offset=0, scope=None)
        elif call == "tinker_runs":
            await tr_svc.list_training_runs(s, principal, limit=20, offset=0, scope=None)
        else:
            raise ValueError(call)


def _scans(node: dict[str, Any]) -> list[str]:
    out = []
    kind = node.get("Node Type", "")
    if "Scan" in kind:
        backward = " Backward" if node.get("Scan Direction") == "Backward" else ""
        target = node.get("Index Name") or node.get("Relation Name") or ""
        out.append(f"{kind}{backward} {target}".strip())
    for child in node.get("Plans", []):
        out += _scans(child)
    return out


async def explain_service_call(db: Database, tenant: Tenant, call: str, kwargs: dict[str, Any]) -> tuple[str, float]:
    """Scan nodes of the plans of every statement the call runs, and their summed execution
    time in ms (also returned as a number)."""
    principal = Principal(tenant.org_id, tenant.user_id, "bench", frozenset(s.value for s in ALL_SCOPES))
    captured: list[tuple[str, Any]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):  # type: ignore[no-untyped-def]
        captured.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await _call(db, principal, call, kwargs)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
    scans: dict[str, None] = {}
    total_ms = 0.0
    async with db.engine.connect() as conn:
        for statement, params in captured:
            raw = (await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params)).scalar_one()
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
            scans.update(dict.fromkeys(_scans(plan["Plan"])))
            total_ms += plan["Execution Time"]
    n = f"{len(captured)} statements: " if len(captured) > 1 else ""
    return f"{n}{', '.join(scans)} ({total_ms:.2f} ms)", total_ms
