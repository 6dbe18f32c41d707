"""Guard rails per org: active sessions, active runs, futures in flight, and the smaller body
limit of the routes that create resources. Each refusal names its limit."""

from __future__ import annotations

from typing import Any

import httpx

from tests.control_plane.conftest import TEST_MODEL
from tests.control_plane.test_capacity import CapiFactory, _loops_session, _tinker_session, _trainer, capi

__all__ = ["capi"]


def _limit_refusal(res: httpx.Response, reason: str) -> dict[str, Any]:
    assert res.status_code == 429, res.text
    body: dict[str, Any] = res.json()
    assert body["code"] == "limit_exceeded" and body["details"] == {"reason": reason}
    assert reason in body["detail"] and "Retry-After" in res.headers
    return body


async def test_active_sessions_per_org(capi: CapiFactory) -> None:
    async with capi(max_active_sessions_per_org=2) as api:
        t = await api.tenant("acme")
        other = await api.tenant("bravo")
        await _loops_session(api, t)
        sid = await _tinker_session(api, t)
        _limit_refusal(
            await api.client.post("/v1/loops/sessions", json={}, headers=t.headers), "max_active_sessions_per_org"
        )
        res = await api.client.post(
            "/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"}, headers=t.headers
        )
        _limit_refusal(res, "max_active_sessions_per_org")
        await _loops_session(api, other)  # another org's count is its own
        # a finished session no longer counts
        fin = await api.client.post(f"/api/v1/sessions/{sid}/finish", json={}, headers=t.headers)
        assert fin.status_code == 200, fin.text
        await _loops_session(api, t)


async def test_active_runs_per_org(capi: CapiFactory) -> None:
    async with capi(max_active_runs_per_org=2) as api:
        t = await api.tenant("acme")
        sid = await _loops_session(api, t)
        first = (await _trainer(api, t, sid)).json()["run"]
        assert (await _trainer(api, t, sid)).status_code == 200
        _limit_refusal(await _trainer(api, t, sid), "max_active_runs_per_org")
        tsid = await _tinker_session(api, t)
        res = await api.client.post(
            "/api/v1/create_model",
            json={"session_id": tsid, "model_seq_id": 0, "base_model": TEST_MODEL},
            headers=t.headers,
        )
        _limit_refusal(res, "max_active_runs_per_org")
        deact = await api.client.post(f"/v1/loops/runs/{first['id']}/deactivate", headers=t.headers)
        assert deact.status_code == 200
        assert (await _trainer(api, t, sid)).status_code == 200


async def test_inflight_futures_per_org(capi: CapiFactory) -> None:
    async with capi(max_inflight_futures_per_org=2) as api:
        t = await api.tenant("acme")
        other = await api.tenant("bravo")
        sid = await _tinker_session(api, t)

        async def create(tenant: Any, session_id: str, seq: int) -> httpx.Response:
            return await api.client.post(
                "/api/v1/create_model",
                json={"session_id": session_id, "model_seq_id": seq, "base_model": TEST_MODEL},
                headers=tenant.headers,
            )

        # each model's create op is a future nobody answers (no worker runs here)
        a, b = await create(t, sid, 0), await create(t, sid, 1)
        assert a.status_code == 200 and b.status_code == 200
        again = await create(t, sid, 0)  # a retried create is the same future, not a new one
        assert again.status_code == 200 and again.json()["request_id"] == a.json()["request_id"]
        body = _limit_refusal(await create(t, sid, 2), "max_inflight_futures_per_org")
        assert "2 training ops and samples in flight" in body["detail"]
        assert (await create(other, await _tinker_session(api, other), 0)).status_code == 200
        # an answered future leaves room (the worker writes its hash; pruning is lazy)
        from control_plane.training.queue import TrainerQueue
        from data_plane.wire.queue import ErrorCategory, FutureResult

        await TrainerQueue(api.runtime.redis).complete(
            a.json()["model_id"], a.json()["request_id"], FutureResult.failed("x", ErrorCategory.USER)
        )
        await api.runtime.redis.delete(f"openloops:inflight-pruned:{t.org_id}")  # the once-a-second prune marker
        assert (await create(t, sid, 2)).status_code == 200


async def test_control_routes_take_a_smaller_body(capi: CapiFactory) -> None:
    async with capi(control_body_limit_bytes=4096) as api:
        t = await api.tenant("acme")
        big = {"tags": [], "user_metadata": {"x": "a" * 8000}, "sdk_version": "0.38.0"}
        res = await api.client.post("/api/v1/create_session", json=big, headers=t.headers)
        assert res.status_code == 413, res.text
        assert "4096 bytes" in res.json()["detail"] and res.json()["code"] == "payload_too_large"
        res = await api.client.post("/v1/loops/sessions", json={"training_project_id": "p" * 5000}, headers=t.headers)
        assert res.status_code == 413 and "OPENLOOPS_CONTROL_BODY_LIMIT_BYTES" in res.json()["detail"]
        # an op route keeps the general limit: a body this size is not refused for its size
        sid = await _tinker_session(api, t)
        created = await api.client.post(
            "/api/v1/create_model",
            json={"session_id": sid, "model_seq_id": 0, "base_model": TEST_MODEL},
            headers=t.headers,
        )
        mid = created.json()["model_id"]
        res = await api.client.post(
            "/api/v1/optim_step",
            json={"model_id": mid, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}, "pad": "p" * 8000},
            headers=t.headers,
        )
        assert res.status_code != 413, res.text
