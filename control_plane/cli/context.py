"""What CLI commands share: settings, resolved state URLs, output helpers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from control_plane.local_mode import runtime_file
from control_plane.local_mode.embedded import start_postgres, start_valkey
from control_plane.settings import Settings

console = Console()
err_console = Console(stderr=True)


class Resolved:
    """Settings with database/redis URLs resolved (embedded servers started if unset)."""

    def __init__(self, settings: Settings, *, need_redis: bool = True) -> None:
        self._handles: list[Any] = []
        updates: dict[str, Any] = {}
        if not settings.database_url:
            pg = start_postgres(settings.data_dir / "postgres" / "data")
            self._handles.append(pg)
            updates["database_url"] = pg.url
        if need_redis and not settings.redis_url:
            live = runtime_file.read_live(settings.data_dir)
            if live and live.get("redis_url"):
                updates["redis_url"] = live["redis_url"]
            else:
                vk = start_valkey(settings.data_dir / "valkey")
                self._handles.append(vk)
                updates["redis_url"] = vk.url
        self.settings = settings.model_copy(update=updates)

    @property
    def database_url(self) -> str:
        assert self.settings.database_url  # set or started above
        return self.settings.database_url

    @property
    def redis_url(self) -> str:
        if not self.settings.redis_url:
            raise RuntimeError("this command was resolved without Redis")
        return self.settings.redis_url

    def close(self) -> None:
        for h in reversed(self._handles):
            h.stop()
        self._handles.clear()


def _plain(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool, title: str | None = None) -> None:
    if as_json:
        print(json.dumps([{k: _plain(r.get(k)) for k in r} for r in rows], indent=2, default=str))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if r.get(c) is None else str(_plain(r.get(c))) for c in columns])
    console.print(table)
    if not rows:
        console.print("[dim](none)[/dim]")


def emit_one(row: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: _plain(v) for k, v in row.items()}, indent=2, default=str))
    else:
        for k, v in row.items():
            console.print(f"[bold]{k}[/bold]: {_plain(v)}")
