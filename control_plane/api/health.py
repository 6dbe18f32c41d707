"""Liveness, readiness, Prometheus metrics and signed local-store downloads (no API key)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.auth.signed_urls import InvalidSignature
from control_plane.errors import Forbidden, InvalidInput, NotFound
from data_plane.storage.base import ObjectNotFound

# what control_plane/auth/signed_urls.py signs: base64url payload "." base64url signature
DOWNLOAD_TOKEN = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"


class Health(msgspec.Struct):
    status: str  # ok


class Readiness(msgspec.Struct):
    status: str  # ok | unavailable
    checks: dict[str, str]  # per dependency: ok, or the error


@get("/healthz", include_in_schema=True, tags=["health"], responses=raises(public=True))
async def healthz() -> Health:
    return Health(status="ok")


@get(
    "/readyz",
    tags=["health"],
    responses={
        **raises(public=True, ok=Readiness),
        503: ResponseSpec(Readiness, description="Postgres or Redis does not answer", generate_examples=False),
    },
)
async def readyz(request: Request) -> Response[Readiness]:
    r = rt(request)
    checks: dict[str, str] = {}
    ok = True
    for name, probe in (("postgres", r.db.ping), ("redis", r.redis.ping)):
        try:
            await asyncio.wait_for(probe(), timeout=2.0)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - readiness reports any failure
            checks[name] = f"error: {exc.__class__.__name__}: {exc}"
            ok = False
    return Response(Readiness(status="ok" if ok else "unavailable", checks=checks), status_code=200 if ok else 503)


@get("/metrics", tags=["health"], media_type=CONTENT_TYPE_LATEST, responses=raises(public=True))
async def metrics(request: Request) -> Response[bytes]:
    registry = request.app.state.http_metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@get(
    "/v1/downloads/{token:str}",
    tags=["downloads"],
    media_type="application/octet-stream",
    responses=raises(
        InvalidInput, Forbidden, NotFound, public=True, ok=bytes, ok_media_type="application/octet-stream"
    ),
)
async def download(
    request: Request,
    token: Annotated[str, Parameter(pattern=DOWNLOAD_TOKEN, description="the signed token of a download URL")],
) -> Stream:
    """An object of the local store, by the signed, expiring token of its download URL."""
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
