"""``openloops admin usage``: an org's usage for operators, the report of
``GET /v1/loops/usage`` (control_plane/metering/usage_report.py) as a table or JSON."""

from __future__ import annotations

import json
from typing import Any

from control_plane.catalog import ModelCatalog
from control_plane.db.engine import Database
from control_plane.metering.usage_report import UsagePolicy, UsageWindow, usage_report
from control_plane.services import identity
from control_plane.settings import Settings

COLUMNS = [
    "item",
    "name",
    "worker_hours",
    "tokens_trained",
    "steps",
    "sampled_requests",
    "sampled_tokens",
    "served_requests",
    "served_tokens",
]


async def report(
    d: Database, settings: Settings, org: str, since: str | None, until: str | None, group_by: str | None
) -> dict[str, Any]:
    window = UsageWindow.parse(since, until, group_by)
    policy = UsagePolicy(ModelCatalog.load(settings.resolved_catalog_path), settings.trainer_ranks)
    async with d.session() as s:
        org_id = (await identity.get_org(s, org)).id
        return await usage_report(s, policy, org_id, window)


def table_rows(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per item, then the totals: worker time in hours per GPU type, token counts
    as prompt + generated."""
    return [_row(_label(item), item) for item in rep["items"]] + [_row("total", rep["totals"])]


def _label(item: dict[str, Any]) -> str:
    if "day" in item:
        return str(item["day"])
    kind = item.get("kind")
    if kind == "run":
        return f"run {item['run_id']}"
    if kind == "samplers":
        return f"samplers of {item['base_model']}"
    return f"served model {item.get('served_model_id')}"


def _row(label: str, c: dict[str, Any]) -> dict[str, Any]:
    hours = ", ".join(f"{t} {secs / 3600:.3f}" for t, secs in c["worker_seconds"].items()) or "0"
    sampled, served = c["sampling"], c["served"]
    return {
        "item": label,
        "name": c.get("name") or "",
        "worker_hours": hours,
        "tokens_trained": c["tokens_trained"],
        "steps": c["training_steps"],
        "sampled_requests": sampled["requests"],
        "sampled_tokens": sampled["prompt_tokens"] + sampled["completion_tokens"],
        "served_requests": served["requests"],
        "served_tokens": served["prompt_tokens"] + served["completion_tokens"],
    }


def dumps(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=2)
