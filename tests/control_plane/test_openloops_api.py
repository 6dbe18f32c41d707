"""The /v1/openloops extension routes (who a key is, the org's API keys, runs with their activity
and status history) and the console's page shell (real Postgres and Redis)."""

from __future__ import annotations

from control_plane.statuses import Scope
from tests.control_plane.conftest import TEST_MODEL

ALL = [s.value for s in Scope]


async def new_run(api, t) -> dict:
    r = await api.client.post("/v1/loops/sessions", headers=t.headers, json={})
    sid = r.json()["session"]["id"]
    r = await api.client.post("/v1/loops/runs", headers=t.headers, json={"session_id": sid, "base_model": TEST_MODEL})
    assert r.status_code == 200, r.text
    return r.json()["run"]


async def test_whoami(api):
    t = await api.tenant("acme", email="ann@example.com")
    r = await api.client.get("/v1/openloops/whoami", headers=t.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["org_id"] == t.org_id and body["org_name"] == "acme"
    assert body["principal_id"] == t.user_id and body["principal_name"] == "ann@example.com"
    assert body["scopes"] == sorted(t.principal.scopes) and "manage_org_api_keys" not in body["scopes"]
    r = await api.client.get("/v1/openloops/whoami", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/json")


async def test_api_keys_need_their_scope_and_stay_in_the_org(api):
    admin = await api.tenant("acme", scopes=ALL, email="admin@example.com")
    plain = await api.tenant("acme", email="plain@example.com")
    other = await api.tenant("globex", scopes=ALL, email="x@globex.example")

    r = await api.client.get("/v1/openloops/api_keys", headers=plain.headers)
    assert r.status_code == 403 and "manage_org_api_keys" in r.json()["detail"]
    r = await api.client.get("/v1/openloops/api_keys", headers=admin.headers)
    assert r.status_code == 200
    owners = {k["owner"] for k in r.json()["keys"]}
    assert owners == {"admin@example.com", "plain@example.com"}  # globex's key is not listed

    # create: the secret once, the caller's training scopes by default, never beyond its own
    r = await api.client.post("/v1/openloops/api_keys", headers=admin.headers, json={"name": "ci"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["key"]["name"] == "ci" and made["key"]["owner"] == "admin@example.com"
    assert set(made["key"]["scopes"]) == {Scope.MANAGE_ORG_TRAINING_PROJECTS.value, Scope.MANAGE_OWN.value}
    assert made["api_key"].startswith(made["key"]["prefix"])
    who = await api.client.get("/v1/openloops/whoami", headers={"Authorization": f"Bearer {made['api_key']}"})
    assert who.status_code == 200 and who.json()["org_id"] == admin.org_id
    listed = (await api.client.get("/v1/openloops/api_keys", headers=admin.headers)).json()["keys"]
    assert "api_key" not in listed[0] and made["api_key"] not in str(listed)
    for bad, field in (({"scopes": ["root"]}, "scopes"), ({"name": ""}, None), ({"color": "red"}, None)):
        r = await api.client.post("/v1/openloops/api_keys", headers=admin.headers, json=bad)
        assert r.status_code == 400, (bad, r.text)
        if field:
            assert r.json()["field"] == field
    # a key with fewer scopes cannot mint more
    limited = await api.tenant("acme", scopes=[Scope.MANAGE_ORG_API_KEYS.value], email="lim@example.com")
    r = await api.client.post("/v1/openloops/api_keys", headers=limited.headers, json={"scopes": ALL})
    assert r.status_code == 403 and "lacks" in r.json()["detail"]

    # revoke: another org's key is not found; the revoked key stops working at once
    r = await api.client.post(f"/v1/openloops/api_keys/{other.principal.key_id}/revoke", headers=admin.headers)
    assert r.status_code == 404
    r = await api.client.post(f"/v1/openloops/api_keys/{made['key']['id']}/revoke", headers=admin.headers)
    assert r.status_code == 200 and r.json()["revoked_at"]
    who = await api.client.get("/v1/openloops/whoami", headers={"Authorization": f"Bearer {made['api_key']}"})
    assert who.status_code == 401
    keys = (await api.client.get("/v1/openloops/api_keys", headers=admin.headers)).json()["keys"]
    assert made["key"]["id"] not in {k["id"] for k in keys}
    keys = (await api.client.get("/v1/openloops/api_keys?include_revoked=true", headers=admin.headers)).json()["keys"]
    assert made["key"]["id"] in {k["id"] for k in keys}


async def test_runs_with_activity_pages_filters_and_history(api):
    t = await api.tenant("acme")
    other = await api.tenant("globex")
    runs = [await new_run(api, t) for _ in range(3)]
    await new_run(api, other)

    seen, cursor = [], None
    while True:
        q = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await api.client.get("/v1/openloops/runs", headers=t.headers, params=q)
        assert r.status_code == 200, r.text
        seen += [x["id"] for x in r.json()["runs"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [x["id"] for x in reversed(runs)]  # newest first, each once, this org only
    row = (await api.client.get("/v1/openloops/runs", headers=t.headers)).json()["runs"][0]
    assert row["created_by"] == "u@example.com" and row["origin"] == "loops" and row["status"] == "DEPLOYING"
    assert "last_request_at" in row
    r = await api.client.get("/v1/openloops/runs", headers=t.headers, params={"status": "active"})
    assert r.json()["runs"] == []
    r = await api.client.get("/v1/openloops/runs", headers=t.headers, params={"base_model": TEST_MODEL})
    assert len(r.json()["runs"]) == 3
    for bad in ({"limit": 0}, {"limit": 501}, {"cursor": "garbage!"}):
        r = await api.client.get("/v1/openloops/runs", headers=t.headers, params=bad)
        assert r.status_code == 400, (bad, r.text)

    r = await api.client.get(f"/v1/openloops/runs/{runs[0]['id']}/status_history", headers=t.headers)
    assert r.status_code == 200
    changes = r.json()["changes"]
    assert {(c["resource_type"], c["to_status"]) for c in changes} >= {("run", "DEPLOYING")}
    assert all(c["resource_id"] in (runs[0]["id"], runs[0]["deployment_id"]) for c in changes)
    r = await api.client.get(f"/v1/openloops/runs/{runs[0]['id']}/status_history", headers=other.headers)
    assert r.status_code == 404


async def test_the_console_shell_and_assets(api):
    for path in ("/console", "/console/runs", "/console/runs/some-run", "/console/anything/else"):
        r = await api.client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith("text/html")
        assert (
            "default-src 'none'" in r.headers["content-security-policy"]
            and "connect-src 'self'" in r.headers["content-security-policy"]
        )
        assert '<script type="module" src="/console/assets/app.js">' in r.text
    for asset, kind in (
        ("app.js", "javascript"),
        ("api.js", "javascript"),
        ("charts.js", "javascript"),
        ("style.css", "css"),
    ):
        r = await api.client.get(f"/console/assets/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    r = await api.client.get("/console/assets/missing.js")
    assert r.status_code == 404
    # the shell never carries a key or data: the page asks the API with the key it holds
    r = await api.client.get("/console/runs")
    assert "Api-Key" not in r.text and "sessionStorage" not in r.text
