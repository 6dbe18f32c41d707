"""Liveness, readiness, Prometheus metrics and signed local-store downloads (no API key)."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import MediaType, Request, Response, get
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control_plane.api.state import rt
from control_plane.auth.signed_urls import InvalidSignature
from control_plane.errors import Forbidden, NotFound
from data_plane.storage.base import ObjectNotFound


@get("/healthz", include_in_schema=True, tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", tags=["health"])
async def readyz(request: Request) -> Response:
    r = rt(request)
    checks: dict[str, Any] = {}
    ok = True
    for name, probe in (("postgres", r.db.ping), ("redis", r.redis.ping)):
        try:
            await asyncio.wait_for(probe(), timeout=2.0)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - readiness reports any failure
            checks[name] = f"error: {exc.__class__.__name__}: {exc}"
            ok = False
    return Response({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@get("/metrics", tags=["health"], media_type=CONTENT_TYPE_LATEST)
async def metrics(request: Request) -> Response:
    registry = request.app.state.http_metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@get("/v1/downloads/{token:str}", tags=["downloads"], media_type=MediaType.TEXT)
async def download(request: Request, token: str) -> Stream:
    r = rt(request)
    try:
        key = r.signer.verify(token)
    except (InvalidSignature, ValueError) as exc:
        raise Forbidden(str(exc)) from exc
    try:
        data = await asyncio.to_thread(r.store.get_bytes, key)
    except ObjectNotFound as exc:
        raise NotFound("object", key.rsplit("/", 1)[-1]) from exc
    return Stream(
        iter([data]),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(len(data)),
            "Content-Disposition": f'attachment; filename="{key.rsplit("/", 1)[-1]}"',
        },
    )
