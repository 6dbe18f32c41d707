"""The unmodified tinker SDK waits through a capacity refusal: its client retries the 429
``loops_capacity`` of ``create_model`` after ``Retry-After`` and succeeds once the org's
ceiling has room (an API server under uvicorn; no worker starts, so only the create is
checked, through the SDK's own HTTP client and retry loop)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from tinker import types
from tinker._client import AsyncTinker

from control_plane.db.models import Run
from tests.control_plane.conftest import TEST_MODEL, make_tenant
from tests.infra.api_server import ApiServer

_REFUSED = re.compile(r'openloops_http_requests_total\{method="POST",route="/api/v1/create_model",status="429"\} (\S+)')


def _refusals(client: httpx.Client) -> float:
    m = _REFUSED.search(client.get("/metrics").text)
    return float(m.group(1)) if m else 0.0


def test_tinker_sdk_retries_a_capacity_refusal(start_api_server: Callable[..., ApiServer]) -> None:
    server = start_api_server(capacity_default_max_gpus={"cpu": 1}, capacity_retry_after_seconds=1)
    tenant = server.call(make_tenant(server.runtime, "acme"))
    with httpx.Client(base_url=server.base_url, headers=tenant.headers, timeout=30) as http:
        loops_sid = http.post("/v1/loops/sessions", json={}).json()["session"]["id"]
        holder = http.post("/v1/loops/trainers", json={"session_id": loops_sid, "base_model": TEST_MODEL})
        assert holder.status_code == 200, holder.text
        sid = http.post("/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
        sid = sid.json()["session_id"]
        request = types.CreateModelRequest(
            session_id=sid, model_seq_id=0, base_model=TEST_MODEL, lora_config=types.LoraConfig(rank=8)
        )
        outcome: dict[str, Any] = {}

        def sdk() -> None:
            async def create() -> Any:
                client = AsyncTinker(base_url=server.base_url, api_key=tenant.key, max_retries=30)
                try:
                    return await client.models.create(request=request)
                finally:
                    await client.close()

            try:
                outcome["future"] = asyncio.run(create())
            except BaseException as exc:  # reported by the assertion below
                outcome["error"] = exc

        thread = threading.Thread(target=sdk, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while _refusals(http) < 2 and time.monotonic() < deadline:  # the SDK was refused twice
            time.sleep(0.2)
        assert _refusals(http) >= 2 and "future" not in outcome and "error" not in outcome
        freed = http.post(f"/v1/loops/runs/{holder.json()['run']['id']}/deactivate")
        assert freed.status_code == 200
        thread.join(60)
        assert "error" not in outcome, outcome.get("error")
        future = outcome["future"]
        assert future.model_id == f"{sid}:train:0" and future.request_id.startswith("req-")

    async def run_row() -> Run | None:
        async with server.runtime.db.session() as s:
            return await s.get(Run, f"{sid}:train:0")

    row = server.call(run_row())
    assert row is not None and row.origin == "tinker"
