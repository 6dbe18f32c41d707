"""``/console``: the same page shell for every console path (the script in it draws the page of
the path), and its assets. Nothing here needs a key: every figure on a page comes from the JSON
API, which checks the key the page sends."""

from __future__ import annotations

from pathlib import Path

from litestar import Response, Router, get
from litestar.static_files import create_static_files_router

ASSETS = Path(__file__).parent / "assets"
# the page loads only its own script, style and images, and talks only to this server
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _shell() -> Response[bytes]:
    return Response(
        (ASSETS / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS
    )


@get("/", include_in_schema=False, sync_to_thread=False)
def console_root() -> Response[bytes]:
    return _shell()


@get("/{page:path}", include_in_schema=False, sync_to_thread=False)
def console_page(page: str) -> Response[bytes]:
    return _shell()


console_router = Router(
    path="/console",
    route_handlers=[
        create_static_files_router(path="/assets", directories=[ASSETS], include_in_schema=False),
        console_root,
        console_page,
    ],
)
