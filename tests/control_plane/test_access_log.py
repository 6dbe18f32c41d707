"""Structured access logs: one JSON line per request with its request id, route, status,
duration and principal, the same id the response carries (``X-Request-Id``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import structlog

from control_plane.api.app import create_app
from control_plane.cli.main import configure_logging
from control_plane.runtime import build_runtime
from tests.control_plane.conftest import make_settings, make_tenant
from tests.infra.services import TestServices


def _lines(out: str) -> list[dict]:
    return [json.loads(x) for x in out.splitlines() if x.startswith("{") and '"event":"request"' in x.replace(" ", "")]


async def test_one_json_line_per_request(clean_state, services: TestServices, data_dir: Path, capsys) -> None:
    settings = make_settings(services, data_dir, access_log=True, log_json=True)
    before = structlog.get_config()
    configure_logging(settings)
    runtime = build_runtime(settings, with_backend=False)
    try:
        t = await make_tenant(runtime, "acme")
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            mine = await c.get("/v1/loops/runs/run-missing", headers={**t.headers, "X-Request-Id": "trace-42"})
            anon = await c.get("/v1/loops/runs")
        assert mine.status_code == 404 and mine.headers["x-request-id"] == "trace-42"
        assert anon.status_code == 401 and len(anon.headers["x-request-id"]) == 32  # generated
        structlog.get_config()["logger_factory"].buffer.flush()  # lines are written in batches
        lines = _lines(capsys.readouterr().out)
        assert len(lines) == 2, lines
        first, second = lines
        assert first["request_id"] == "trace-42" and first["status"] == 404
        assert first["method"] == "GET" and first["path"] == "/v1/loops/runs/run-missing"
        assert first["route"] == "/v1/loops/runs/{run_id}"
        assert first["principal"] == t.principal.principal_id and first["level"] == "info"
        assert isinstance(first["duration_ms"], float) and first["timestamp"].endswith("Z")
        assert second["request_id"] == anon.headers["x-request-id"] and second["status"] == 401
        assert second["principal"] is None
        # the metrics saw the same requests
        metrics = (await httpx.AsyncClient(transport=transport, base_url="http://testserver").get("/metrics")).text
        assert 'openloops_http_requests_total{method="GET",route="/v1/loops/runs/{run_id}",status="404"} 1.0' in metrics
    finally:
        await runtime.close()
        structlog.configure(**before)
