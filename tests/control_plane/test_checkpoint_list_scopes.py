"""GET /v1/loops/checkpoints is a manage_own_user_or_service_account list: by default the
caller's own checkpoints, with ?scope=org the org's, never another org's, whichever of
run_id / base_model / checkpoint_path selects them (run_id lists check tenancy on the run)."""

from __future__ import annotations

from tests.control_plane.conftest import TEST_MODEL
from tests.control_plane.seed import add_checkpoint


async def _ids(api, tenant, query: str) -> list[str]:
    r = await api.client.get(f"/v1/loops/checkpoints?{query}", headers=tenant.headers)
    assert r.status_code == 200, r.text
    return [c["id"] for c in r.json()["checkpoints"]]


async def test_checkpoint_lists_by_scope(api):
    ana = await api.tenant("acme", email="ana@acme.io")
    bob = await api.tenant("acme", email="bob@acme.io")
    eve = await api.tenant("evil", email="eve@evil.io")
    sid = (await api.client.post("/v1/loops/sessions", headers=ana.headers, json={})).json()["session"]["id"]
    r = await api.client.post("/v1/loops/runs", headers=ana.headers, json={"session_id": sid, "base_model": TEST_MODEL})
    run_id = r.json()["run"]["id"]
    c1 = await add_checkpoint(api.runtime, ana, run_id, "step-1")
    c2 = await add_checkpoint(api.runtime, ana, run_id, "step-2")
    newest_first = [c2.id, c1.id]
    path = f"checkpoint_path=bt://loops:{run_id}/sampler_weights/step-1"

    for query, expected in (
        (f"run_id={run_id}", newest_first),
        (f"base_model={TEST_MODEL}", newest_first),
        (path, [c1.id]),
    ):
        assert await _ids(api, ana, query) == expected, query
        assert await _ids(api, ana, query + "&scope=org") == expected, query
        assert await _ids(api, bob, query) == [], query  # same org, not his
        assert await _ids(api, bob, query + "&scope=org") == expected, query
        assert await _ids(api, eve, query + "&scope=org") == [], query  # another org
    assert await _ids(api, ana, "run_id=run-missing") == []
    r = await api.client.get(f"/v1/loops/checkpoints?run_id={run_id}&scope=everyone", headers=ana.headers)
    assert r.status_code == 400 and r.json()["field"] == "scope"
