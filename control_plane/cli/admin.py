"""``openloops admin``: operator commands against the database, through the service layer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
import typer

from control_plane.api.loops.presenters import served_model_base_url
from control_plane.auth.authenticator import invalidate_key
from control_plane.auth.principal import Principal
from control_plane.catalog import ModelCatalog
from control_plane.cli import admin_capacity, admin_show, admin_usage
from control_plane.cli.context import Resolved, console, emit, emit_one, err_console
from control_plane.db import migrate
from control_plane.db.engine import Database
from control_plane.errors import DomainError
from control_plane.runtime import store_spec
from control_plane.services import admission, identity
from control_plane.services import checkpoint_import as import_svc
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import deployments as dep_svc
from control_plane.services import runs as runs_svc
from control_plane.services import samplers as samplers_svc
from control_plane.services import served_models as sm_svc
from control_plane.settings import Settings

app = typer.Typer(
    help="Operator commands (orgs, users, keys, runs, deployments, served models, database).", no_args_is_help=True
)
orgs = typer.Typer(help="Organizations.", no_args_is_help=True)
users = typer.Typer(help="Users.", no_args_is_help=True)
sas = typer.Typer(help="Service accounts.", no_args_is_help=True)
keys = typer.Typer(help="API keys.", no_args_is_help=True)
runs = typer.Typer(help="Runs (trainers).", no_args_is_help=True)
samplers = typer.Typer(help="Samplers.", no_args_is_help=True)
deployments = typer.Typer(help="Loops deployments (the trainers runs execute on).", no_args_is_help=True)
served_models = typer.Typer(
    help="Served models (checkpoints served as OpenAI-compatible models).", no_args_is_help=True
)
checkpoints = typer.Typer(help="Checkpoints.", no_args_is_help=True)
capacity = typer.Typer(help="GPU ceilings of an org (and what its live workloads hold).", no_args_is_help=True)
db = typer.Typer(help="Schema migrations.", no_args_is_help=True)
for sub, name in (
    (orgs, "orgs"),
    (users, "users"),
    (sas, "service-accounts"),
    (keys, "keys"),
    (runs, "runs"),
    (samplers, "samplers"),
    (deployments, "deployments"),
    (served_models, "served-models"),
    (checkpoints, "checkpoints"),
    (capacity, "capacity"),
    (db, "db"),
):
    app.add_typer(sub, name=name)

T = TypeVar("T")
JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
ORG = typer.Option(..., "--org", help="Org id or name.")


def _run(fn: Callable[[Database, Resolved], Awaitable[T]], *, need_redis: bool = False) -> T:
    resolved = Resolved(Settings(), need_redis=need_redis)

    async def main() -> T:
        database = Database(resolved.database_url)
        try:
            return await fn(database, resolved)
        finally:
            await database.close()

    try:
        return asyncio.run(main())
    except DomainError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    finally:
        resolved.close()


# --- orgs / users / service accounts ---------------------------------------------------


@orgs.command("create")
def org_create(name: str, as_json: bool = JSON) -> None:
    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        async with d.transaction() as s:
            o = await identity.create_org(s, name)
            return {"id": o.id, "name": o.name, "created_at": o.created_at}

    emit_one(_run(go), as_json=as_json)


@orgs.command("list")
def org_list(as_json: bool = JSON) -> None:
    async def go(d: Database, _: Resolved) -> list[dict[str, Any]]:
        async with d.session() as s:
            return [{"id": o.id, "name": o.name, "created_at": o.created_at} for o in await identity.list_orgs(s)]

    emit(_run(go), ["id", "name", "created_at"], as_json=as_json, title="orgs")


@users.command("create")
def user_create(
    org: str = ORG, email: str = typer.Option(..., "--email"), name: str | None = None, as_json: bool = JSON
) -> None:
    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        async with d.transaction() as s:
            u = await identity.create_user(s, await identity.get_org(s, org), email, name)
            return {"id": u.id, "org_id": u.org_id, "email": u.email}

    emit_one(_run(go), as_json=as_json)


@sas.command("create")
def sa_create(org: str = ORG, name: str = typer.Option(..., "--name"), as_json: bool = JSON) -> None:
    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        async with d.transaction() as s:
            sa = await identity.create_service_account(s, await identity.get_org(s, org), name)
            return {"id": sa.id, "org_id": sa.org_id, "name": sa.name}

    emit_one(_run(go), as_json=as_json)


# --- keys ----------------------------------------------------------------------------------


@keys.command("create")
def key_create(
    org: str = ORG,
    owner: str = typer.Option(..., "--owner", help="User id/email or service account id/name."),
    scope: list[str] = typer.Option(
        None,
        "--scope",
        help="Repeat for several; default: the training scopes (manage_org_training_projects, "
        "manage_own_user_or_service_account). manage_org_api_keys (the org's keys, the console's keys page) "
        "only when named.",
    ),
    name: str | None = typer.Option(None, "--name"),
    as_json: bool = JSON,
) -> None:
    """Create an API key. The key itself is printed once and never stored."""

    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        async with d.transaction() as s:
            o = await identity.get_org(s, org)
            created = await identity.create_api_key(s, await identity.find_owner(s, o, owner), scopes=scope, name=name)
            r = created.row
            return {
                "id": r.id,
                "key": created.plaintext,
                "prefix": r.display_prefix,
                "scopes": r.scopes,
                "org_id": r.org_id,
            }

    out = _run(go)
    emit_one(out, as_json=as_json)
    if not as_json:
        console.print("[yellow]Store this key now: it cannot be shown again.[/yellow]")


@keys.command("list")
def key_list(
    org: str = ORG, include_revoked: bool = typer.Option(False, "--include-revoked"), as_json: bool = JSON
) -> None:
    async def go(d: Database, _: Resolved) -> list[dict[str, Any]]:
        async with d.session() as s:
            rows = await identity.list_api_keys(s, await identity.get_org(s, org), include_revoked)
            return [
                {
                    "id": k.id,
                    "prefix": k.display_prefix,
                    "name": k.name,
                    "owner": k.user_id or k.service_account_id,
                    "scopes": ",".join(k.scopes),
                    "created_at": k.created_at,
                    "last_used_at": k.last_used_at,
                    "revoked_at": k.revoked_at,
                }
                for k in rows
            ]

    emit(
        _run(go),
        ["id", "prefix", "name", "owner", "scopes", "created_at", "last_used_at", "revoked_at"],
        as_json=as_json,
        title="api keys",
    )


@keys.command("revoke")
def key_revoke(key: str = typer.Argument(..., help="Key id or display prefix."), as_json: bool = JSON) -> None:
    async def go(d: Database, r: Resolved) -> dict[str, Any]:
        async with d.transaction() as s:
            row = await identity.revoke_api_key(s, await identity.get_api_key(s, key))
        redis = aioredis.Redis.from_url(r.redis_url)
        try:
            await invalidate_key(redis, row.key_hash)
        finally:
            await redis.aclose()
        return {"id": row.id, "prefix": row.display_prefix, "revoked_at": row.revoked_at}

    emit_one(_run(go, need_redis=True), as_json=as_json)


# --- resources -----------------------------------------------------------------------------


async def _admin(d: Database, org: str) -> Principal:
    async with d.session() as s:
        return Principal.admin((await identity.get_org(s, org)).id)


@runs.command("list")
def run_list(org: str = ORG, base_model: str | None = None, as_json: bool = JSON) -> None:
    async def go(d: Database, _: Resolved) -> list[dict[str, Any]]:
        p = await _admin(d, org)
        async with d.session() as s:
            return [
                {
                    "id": x.id,
                    "session_id": x.session_id,
                    "base_model": x.base_model,
                    "status": x.status,
                    "reason": x.status_reason,
                    "created_by": x.created_by,
                    "created_at": x.created_at,
                }
                for x in await runs_svc.list_runs(s, p, base_model=base_model, scope="org")
            ]

    emit(_run(go), ["id", "base_model", "status", "reason", "created_by", "created_at"], as_json=as_json, title="runs")


@runs.command("deactivate")
def run_deactivate(run_id: str, org: str = ORG, as_json: bool = JSON) -> None:
    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        p = await _admin(d, org)
        async with d.transaction() as s:
            x = await runs_svc.deactivate_run(s, p, run_id)
            return {"id": x.id, "status": x.status}

    emit_one(_run(go), as_json=as_json)


@samplers.command("list")
def sampler_list(org: str = ORG, as_json: bool = JSON) -> None:
    async def go(d: Database, _: Resolved) -> list[dict[str, Any]]:
        p = await _admin(d, org)
        async with d.session() as s:
            return [
                {
                    "id": x.id,
                    "run_id": x.run_id,
                    "base_model": x.base_model,
                    "model_path": x.model_path,
                    "status": x.status,
                    "reason": x.status_reason,
                    "created_at": x.created_at,
                }
                for x in await samplers_svc.list_samplers(s, p, scope="org")
            ]

    emit(
        _run(go),
        ["id", "run_id", "base_model", "model_path", "status", "reason", "created_at"],
        as_json=as_json,
        title="samplers",
    )


@deployments.command("list")
def deployment_list(org: str = ORG, as_json: bool = JSON) -> None:
    """Loops deployments: the trainers runs execute on."""

    async def go(d: Database, _: Resolved) -> list[dict[str, Any]]:
        p = await _admin(d, org)
        async with d.session() as s:
            return [
                {
                    "id": x.id,
                    "base_model": x.base_model,
                    "status": x.status,
                    "reason": x.status_reason,
                    "active_run_id": x.active_run_id,
                    "created_at": x.created_at,
                }
                for x in await dep_svc.list_deployments(s, p)
            ]

    emit(
        _run(go),
        ["id", "base_model", "status", "reason", "active_run_id", "created_at"],
        as_json=as_json,
        title="deployments",
    )


@deployments.command("deactivate")
def deployment_deactivate(deployment_id: str, org: str = ORG, as_json: bool = JSON) -> None:
    """Stop a deployment's trainer (its runs become INACTIVE; checkpoints stay)."""

    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        p = await _admin(d, org)
        async with d.transaction() as s:
            x = await dep_svc.deactivate_deployment(s, p, deployment_id)
            return {"id": x.id, "status": x.status}

    emit_one(_run(go), as_json=as_json)


def _served_row(x: sm_svc.Served) -> dict[str, Any]:
    sm = x.model
    return {
        "id": sm.id,
        "name": sm.name,
        "base_model": sm.base_model,
        "status": sm.status,
        "checkpoints": ", ".join(f"{c.model_name} ({c.checkpoint_id})" for c in x.checkpoints),
        "verification": sm.verification,
        "created_at": sm.created_at,
    }


@served_models.command("list")
def served_model_list(
    org: str = ORG,
    live: bool = typer.Option(False, "--live", help="Only those not deactivated or failed."),
    limit: int = typer.Option(sm_svc.MAX_PAGE_SIZE, "--limit", min=1, max=sm_svc.MAX_PAGE_SIZE),
    as_json: bool = JSON,
) -> None:
    """Served models of an org, newest first."""

    async def go(d: Database, _: Resolved) -> list[dict[str, Any]]:
        p = await _admin(d, org)
        async with d.session() as s:
            page = await sm_svc.list_served_models(s, p, limit=limit, live_only=live)
            return [_served_row(x) for x in page.items]

    emit(
        _run(go),
        ["id", "name", "base_model", "status", "checkpoints", "verification", "created_at"],
        as_json=as_json,
        title="served models",
    )


@served_models.command("create")
def served_model_create(
    checkpoint_ids: list[str] = typer.Argument(..., help="sampler_weights checkpoint ids of one base model"),
    org: str = ORG,
    name: str = typer.Option(..., "--name", help="The served model's name (Loops' model_name)."),
    scale_down_delay: int | None = typer.Option(
        None, "--scale-down-delay", min=1, help="Idle seconds before it scales to zero (default: the server's)."
    ),
    as_json: bool = JSON,
) -> None:
    """Serve checkpoints as an OpenAI-compatible model of its own (what POST
    /v1/loops/checkpoints/deploy does); clients name a checkpoint by its name."""
    settings = Settings()

    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        p = await _admin(d, org)
        catalog = ModelCatalog.load(settings.resolved_catalog_path)
        # held to the org's capacity like the API's deploy: raise the ceiling first if need be
        async with d.transaction() as s, admission.workload(s, settings, catalog, p.org_id):
            x = await sm_svc.deploy(
                s,
                p,
                catalog,
                checkpoint_ids=checkpoint_ids,
                model_name=name,
                scale_down_delay_seconds=scale_down_delay or settings.default_scale_down_delay_seconds,
            )
            return {**_served_row(x), "base_url": served_model_base_url(settings.base_url, x.model.id)}

    emit_one(_run(go), as_json=as_json)


@served_models.command("deactivate")
def served_model_deactivate(served_model_id: str, org: str = ORG, as_json: bool = JSON) -> None:
    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        p = await _admin(d, org)
        async with d.transaction() as s:
            x = await sm_svc.deactivate_served_model(s, p, served_model_id)
            return {"id": x.id, "status": x.status}

    emit_one(_run(go), as_json=as_json)


@checkpoints.command("list")
def checkpoint_list(
    org: str = ORG,
    run_id: str | None = typer.Option(None, "--run-id"),
    base_model: str | None = typer.Option(None, "--base-model"),
    as_json: bool = JSON,
) -> None:
    async def go(d: Database, _: Resolved) -> list[dict[str, Any]]:
        p = await _admin(d, org)
        async with d.session() as s:
            return [
                {
                    "id": c.id,
                    "run_id": c.run_id,
                    "kind": c.kind,
                    "name": c.name,
                    "base_model": c.base_model,
                    "size_bytes": c.size_bytes,
                    "created_at": c.created_at,
                }
                for c in await ckpt_svc.list_checkpoints(
                    s, p, run_id=run_id, base_model=base_model, checkpoint_path=None, scope="org"
                )
            ]

    emit(
        _run(go),
        ["id", "run_id", "kind", "name", "base_model", "size_bytes", "created_at"],
        as_json=as_json,
        title="checkpoints",
    )


@checkpoints.command("import")
def checkpoint_import(
    directory: Path = typer.Argument(
        ...,
        exists=True,
        file_okay=False,
        help="A PEFT adapter directory (adapter_config.json, adapter_model.safetensors).",
    ),
    org: str = ORG,
    base_model: str = typer.Option(..., "--base-model", help="The catalog model the adapter adapts."),
    name: str | None = typer.Option(None, "--name", help=f"Checkpoint name (default {import_svc.DEFAULT_NAME})."),
    as_json: bool = JSON,
) -> None:
    """Import a PEFT LoRA adapter as one of the org's sampler_weights checkpoints (deployable, and
    a run's base_checkpoint); it is checked against the base model first."""
    from data_plane.storage.factory import open_store

    async def go(d: Database, r: Resolved) -> dict[str, Any]:
        p = await _admin(d, org)
        done = await import_svc.import_adapter(
            d,
            open_store(store_spec(r.settings)),
            ModelCatalog.load(r.settings.resolved_catalog_path),
            p,
            directory=directory,
            base_model=base_model,
            name=name,
        )
        c = done.checkpoint
        return {
            "id": c.id,
            "run_id": c.run_id,
            "name": c.name,
            "base_model": c.base_model,
            "lora_rank": done.adapter.rank,
            "size_bytes": c.size_bytes,
            "checkpoint_path": f"bt://loops:{c.run_id}/{c.kind}/{c.name}",
            "tinker_path": f"tinker://{c.run_id}/{c.kind}/{c.name}",
        }

    emit_one(_run(go), as_json=as_json)


def _show(kind: str, rid: str, org: str | None, history: int, events: int, as_json: bool) -> None:
    async def go(d: Database, r: Resolved) -> dict[str, Any]:
        return await admin_show.gather(d, r.settings, kind, rid, org=org, history=history, events=events)

    data = _run(go)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        admin_show.render(kind, data)


SHOW_ORG = typer.Option(None, "--org", help="Only if it belongs to this org (id or name).")
HISTORY = typer.Option(20, "--history", min=0, help="Most recent status history rows to show.")
EVENTS = typer.Option(20, "--events", min=0, help="Most recent workload events to show.")


@runs.command("show")
def run_show(
    run_id: str, org: str | None = SHOW_ORG, history: int = HISTORY, events: int = EVENTS, as_json: bool = JSON
) -> None:
    """A run, the trainer workload of its deployment as the backend sees it, and its status history."""
    _show("run", run_id, org, history, events, as_json)


@samplers.command("show")
def sampler_show(
    sampler_id: str, org: str | None = SHOW_ORG, history: int = HISTORY, events: int = EVENTS, as_json: bool = JSON
) -> None:
    """A sampler, the shared vLLM workload of its base model, and its status history."""
    _show("sampler", sampler_id, org, history, events, as_json)


@deployments.command("show")
def deployment_show(
    deployment_id: str, org: str | None = SHOW_ORG, history: int = HISTORY, events: int = EVENTS, as_json: bool = JSON
) -> None:
    """A deployment, its trainer workload as the backend sees it, and its status history."""
    _show("deployment", deployment_id, org, history, events, as_json)


@served_models.command("show")
def served_model_show(
    served_model_id: str, org: str | None = SHOW_ORG, history: int = HISTORY, events: int = EVENTS, as_json: bool = JSON
) -> None:
    """A served model, its vLLM workload as the backend sees it, and its status history."""
    _show("served_model", served_model_id, org, history, events, as_json)


# --- database ------------------------------------------------------------------------------


# --- capacity ------------------------------------------------------------------------------


@capacity.command("show")
def capacity_show(org: str = ORG, as_json: bool = JSON) -> None:
    """Per GPU type: the ceiling that applies (-1: none), the operator's, and the units in use."""
    settings = Settings()

    async def go(d: Database, _: Resolved) -> list[dict[str, Any]]:
        return await admin_capacity.show(d, settings, org)

    emit(_run(go), admin_capacity.COLUMNS, as_json=as_json, title="capacity")


@capacity.command("set")
def capacity_set(
    org: str = ORG,
    gpu_type: str = typer.Option(..., "--gpu-type", help="A catalog GPU type, or cpu for models without GPUs."),
    max_gpus: int | None = typer.Option(
        None, "--max-gpus", min=0, help="The org's ceiling for the type; leave out to go back to the default."
    ),
    as_json: bool = JSON,
) -> None:
    """Set the org's ceiling for one GPU type (overrides OPENLOOPS_CAPACITY_DEFAULT_MAX_GPUS)."""
    settings = Settings()

    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        return await admin_capacity.set_limit(d, settings, org, gpu_type, max_gpus)

    emit_one(_run(go), as_json=as_json)


# --- usage ---------------------------------------------------------------------------------


@app.command("usage")
def usage(
    org: str = ORG,
    since: str | None = typer.Option(
        None, "--since", help="ISO 8601 date or date-time (UTC unless it names a zone); default 30 days ago."
    ),
    until: str | None = typer.Option(None, "--until", help="End of the window (default now)."),
    group_by: str = typer.Option("run", "--group-by", help="run or day."),
    as_json: bool = JSON,
) -> None:
    """An org's usage: worker time by GPU type (observed lifetimes), tokens trained, sampling
    and served-model requests and tokens, per run or per UTC day (GET /v1/loops/usage)."""
    settings = Settings()

    async def go(d: Database, _: Resolved) -> dict[str, Any]:
        return await admin_usage.report(d, settings, org, since, until, group_by)

    rep = _run(go)
    if as_json:
        print(admin_usage.dumps(rep))
        return
    title = f"usage of {rep['org_id']}, {rep['start']} .. {rep['end']}"
    emit(admin_usage.table_rows(rep), admin_usage.COLUMNS, as_json=False, title=title)


@db.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations up to REVISION (default head)."""
    resolved = Resolved(Settings(), need_redis=False)
    try:
        migrate.upgrade(resolved.database_url, revision)
        console.print(f"database at revision {migrate.current_revision_sync(resolved.database_url)}")
    finally:
        resolved.close()


@db.command("current")
def db_current(as_json: bool = JSON) -> None:
    resolved = Resolved(Settings(), need_redis=False)
    try:
        cur = migrate.current_revision_sync(resolved.database_url)
        emit_one(
            {"current": cur, "head": migrate.head_revision(), "up_to_date": cur == migrate.head_revision()},
            as_json=as_json,
        )
    finally:
        resolved.close()
