"""``python -m bench.serve real|bare``: one API server process under load.

``real`` is the openloops API exactly as ``openloops serve`` builds it (settings from the
``OPENLOOPS_*`` environment, logging, middleware, auth), without the controller: a benchmark
must not start workers. ``bare`` is a Litestar app with one route returning static JSON: the
ceiling. Both run under the same uvicorn settings as ``control_plane.server``.
"""

from __future__ import annotations

import sys

import uvicorn
from litestar import Litestar, get

from control_plane import event_loop
from control_plane.server import settle_heap, uvicorn_config
from control_plane.settings import Settings

BARE_BODY: dict[str, object] = {"run": {"id": "run-static", "status": {"name": "ACTIVE"}, "base_model": "bench/model"}}


@get("/static")
async def static_json() -> dict[str, object]:
    return BARE_BODY


async def _serve(kind: str, settings: Settings) -> None:
    runtime = None
    if kind == "bare":
        app: object = Litestar(route_handlers=[static_json], logging_config=None, debug=False)
    else:
        from control_plane.api.app import create_app
        from control_plane.cli.main import configure_logging
        from control_plane.runtime import build_runtime

        configure_logging(settings)
        runtime = build_runtime(settings, with_backend=False)
        app = create_app(runtime)
    settle_heap()  # as openloops serve does (the bare app too: same server settings)
    try:
        await uvicorn.Server(uvicorn_config(app, "127.0.0.1", settings.port)).serve()
    finally:
        if runtime is not None:
            await runtime.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("real", "bare"):
        print("usage: python -m bench.serve real|bare PORT", file=sys.stderr)
        return 2
    # both apps on the event loop the settings name (OPENLOOPS_EVENT_LOOP), like openloops serve
    settings = Settings(port=int(argv[1]))
    event_loop.run(_serve(argv[0], settings), settings.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
