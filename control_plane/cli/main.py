"""The ``openloops`` command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import structlog
import typer

from control_plane import event_loop
from control_plane.cli.admin import app as admin_app
from control_plane.cli.context import Resolved, console, emit, err_console
from control_plane.cli.log_output import BufferedLoggerFactory, UtcTimestamp
from control_plane.local_mode import runtime_file
from control_plane.local_mode.models import LOCAL_MODELS, ModelPrepError, prepare, register
from control_plane.settings import Settings

app = typer.Typer(help="openloops: self-hosted LoRA post-training (Loops + Tinker APIs).", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
models_app = typer.Typer(help="Local models (built or imported offline).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(message)s")
    renderer = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if settings.log_json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[structlog.processors.add_log_level, UtcTimestamp(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=BufferedLoggerFactory(),  # stdout, batched (warnings and errors at once)
    )


def _json_line(event: dict[str, object], **_: object) -> str:
    # msgspec: a fifth of json.dumps' cost per access-log line; anything it cannot encode is
    # written as its str()
    return msgspec.json.encode(event, enc_hook=str).decode()


def _settings(**overrides: object) -> Settings:
    base = Settings()
    settings = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    try:
        event_loop.loop_factory(settings.event_loop)  # fail before starting anything
    except event_loop.EventLoopUnavailable as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    return settings


@app.command()
def up(
    host: str | None = typer.Option(None, "--host", help="Interface to bind (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default 8000)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Where state lives (default ~/.openloops)."),
    model: str = typer.Option(
        "smollm2", "--model", help=f"Default model prepared on first start: {', '.join(LOCAL_MODELS)}."
    ),
) -> None:
    """Start openloops in local mode: embedded PostgreSQL + Valkey (unless URLs are set),
    migrations, a dev org and key, the API server and the controller."""
    from control_plane.db import migrate
    from control_plane.db.engine import Database
    from control_plane.local_mode.bootstrap import ensure_dev_key
    from control_plane.server import serve

    settings = _settings(host=host, port=port, data_dir=data_dir.resolve() if data_dir else None)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    configure_logging(settings.model_copy(update={"log_json": False}))
    resolved = Resolved(settings)
    s = resolved.settings
    try:
        err_console.print(f"[dim]data dir {s.data_dir}[/dim]")
        migrate.upgrade(s.database_url)  # type: ignore[arg-type]
        catalog_path = s.resolved_catalog_path
        from control_plane.catalog import ModelCatalog

        if not ModelCatalog.load(catalog_path).models:
            err_console.print(f"preparing the default model ({model}) — first start only ...")
            register(catalog_path, prepare(model, catalog_path.parent))

        async def key() -> str:
            db = Database(s.database_url)  # type: ignore[arg-type]
            try:
                return await ensure_dev_key(db, s.data_dir, s.dev_org_name, s.dev_user_email)
            finally:
                await db.close()

        api_key = asyncio.run(key())

        def ready(_runtime: object) -> None:
            runtime_file.write(s.data_dir, redis_url=s.redis_url, base_url=s.base_url)
            console.print(f"openloops is up at [bold]{s.base_url}[/bold]")
            console.print(f"API key: [bold]{api_key}[/bold]")
            console.print(f"  export TINKER_BASE_URL={s.base_url}\n  export TINKER_API_KEY={api_key}")
            console.print("[dim]Ctrl-C to stop[/dim]", highlight=False)

        event_loop.run(serve(s, on_ready=ready), s.event_loop)
    except ModelPrepError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        runtime_file.remove(s.data_dir)
        resolved.close()


@app.command("serve")
def serve_cmd(
    host: str | None = typer.Option(None, "--host"),
    port: int | None = typer.Option(None, "--port"),
) -> None:
    """Run the API server and controller against configured Postgres/Redis (production)."""
    from control_plane.server import serve

    settings = _settings(host=host, port=port)
    configure_logging(settings)
    if not settings.database_url or not settings.redis_url:
        err_console.print(
            "[red]error:[/red] OPENLOOPS_DATABASE_URL and OPENLOOPS_REDIS_URL must be set (or use `openloops up`)"
        )
        raise typer.Exit(2)
    event_loop.run(serve(settings), settings.event_loop)


@models_app.command("prepare")
def models_prepare(kind: str = typer.Argument(..., help=", ".join(LOCAL_MODELS))) -> None:
    """Build or import a local model and register it in the catalog."""
    settings = Settings()
    try:
        m = prepare(kind, settings.resolved_catalog_path.parent)
    except ModelPrepError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    register(settings.resolved_catalog_path, m)
    console.print(f"registered [bold]{m.name}[/bold] ({m.source})")


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Models in the catalog."""
    from control_plane.catalog import ModelCatalog

    cat = ModelCatalog.load(Settings().resolved_catalog_path)
    emit(
        [m.model_dump() for m in cat.models],
        ["name", "max_context_length", "trainable", "sampleable", "source"],
        as_json=as_json,
        title="models",
    )


if __name__ == "__main__":
    app()
