"""The full scope table, cross-org isolation for every route, key headers, revocation
latency across replicas, and rate limiting."""

from __future__ import annotations

import asyncio
import time

import httpx

from control_plane.api.app import create_app
from control_plane.auth.authenticator import invalidate_key
from control_plane.runtime import build_runtime
from control_plane.services import identity
from tests.control_plane.conftest import ORG_ONLY, OWN_ONLY, TEST_MODEL, make_settings
from tests.control_plane.seed import add_checkpoint

ORG = "manage_org_training_projects"
OWN = "manage_own_user_or_service_account"


async def world(api, t):
    """One of every resource, owned by tenant ``t``."""
    sid = (await api.client.post("/v1/loops/sessions", headers=t.headers, json={})).json()["session"]["id"]
    run = (
        await api.client.post("/v1/loops/runs", headers=t.headers, json={"session_id": sid, "base_model": TEST_MODEL})
    ).json()["run"]
    ck = await add_checkpoint(api.runtime, t, run["id"], "s1")
    return {"sid": sid, "run": run["id"], "sampler": run["sampler"]["id"], "ckpt": ck.id, "dep": run["deployment_id"]}


def routes(w):
    """(method, path, json, required scope) for all 16 routes of the scope table + extensions."""
    return [
        ("POST", "/v1/loops/sessions", {}, ORG),
        ("GET", f"/v1/loops/sessions/{w['sid']}", None, ORG),
        ("POST", "/v1/loops/runs", {"session_id": w["sid"], "base_model": TEST_MODEL}, ORG),
        ("GET", "/v1/loops/runs", None, OWN),
        ("GET", f"/v1/loops/runs/{w['run']}", None, ORG),
        ("POST", "/v1/loops/samplers", {"session_id": w["sid"], "base_model": TEST_MODEL}, ORG),
        ("GET", "/v1/loops/samplers", None, OWN),
        ("GET", f"/v1/loops/samplers/{w['sampler']}", None, ORG),
        ("GET", f"/v1/loops/checkpoints?run_id={w['run']}", None, OWN),
        (
            "POST",
            "/v1/loops/checkpoints/validate",
            {"checkpoint_path": f"bt://loops:{w['run']}/sampler_weights/s1"},
            OWN,
        ),
        ("GET", f"/v1/loops/checkpoints/{w['ckpt']}/files", None, ORG),
        ("GET", "/v1/loops/deployments", None, ORG),
        ("GET", f"/v1/loops/deployments/{w['dep']}", None, ORG),
        ("POST", f"/v1/loops/deployments/{w['dep']}/deactivate", None, ORG),
        ("POST", f"/v1/loops/deployments/{w['dep']}/metrics", {}, ORG),
        ("GET", "/v1/loops/capabilities", None, OWN),
        # extensions
        ("POST", "/v1/loops/trainers", {"session_id": w["sid"], "base_model": TEST_MODEL}, ORG),
        ("POST", f"/v1/loops/runs/{w['run']}/deactivate", None, ORG),
    ]


async def call(api, method, path, body, headers):
    return await api.client.request(method, path, json=body, headers=headers)


async def test_scope_table(api):
    owner = await api.tenant("acme")
    w = await world(api, owner)
    only = {
        ORG: await api.tenant("acme", scopes=ORG_ONLY, email="org@acme.io"),
        OWN: await api.tenant("acme", scopes=OWN_ONLY, email="own@acme.io"),
    }
    for method, path, body, scope in routes(w):
        other = OWN if scope == ORG else ORG
        r = await call(api, method, path, body, only[other].headers)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert r.json()["code"] == "forbidden" and scope in r.json()["detail"]
        r = await call(api, method, path, body, only[scope].headers)
        assert r.status_code == 200, (method, path, r.status_code, r.text)


async def test_cross_org_isolation_matrix(api):
    a = await api.tenant("acme")
    b = await api.tenant("globex")
    w = await world(api, a)
    for method, path, body, _ in routes(w):
        r = await call(api, method, path, body, b.headers)
        has_id = any(v in path or (body and v in str(body)) for v in w.values())
        if not has_id:  # org-wide lists and creations without foreign ids: must not show A's rows
            assert r.status_code in (200,), (method, path, r.text)
            assert not any(v in r.text for v in (w["run"], w["sampler"], w["ckpt"], w["dep"])), (method, path)
        elif path.startswith("/v1/loops/checkpoints?"):
            assert r.status_code == 200 and r.json()["checkpoints"] == []
        elif method == "POST" and path in ("/v1/loops/runs", "/v1/loops/samplers", "/v1/loops/trainers"):
            assert r.status_code == 404, (method, path, r.text)  # A's session id is unknown to B
        elif path == "/v1/loops/checkpoints/validate":
            assert r.status_code == 400, (method, path, r.text)  # inaccessible path → 400 per spec
        else:
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.json()["code"] == "not_found"
    # and B's org-scoped lists stay empty
    for path in ("/v1/loops/runs?scope=org", "/v1/loops/samplers?scope=org", "/v1/loops/deployments"):
        body = (await api.client.get(path, headers=b.headers)).json()
        assert list(body.values()) == [[]], path
    # A's rows untouched by B's attempts (deactivate 404'd)
    r = await api.client.get(f"/v1/loops/deployments/{w['dep']}", headers=a.headers)
    assert r.json()["deployment"]["status"]["name"] == "DEPLOYING"


async def test_legacy_routes_match_canonical(api):
    t = await api.tenant("acme")
    sid = (await api.client.post("/v1/trainer_sessions", headers=t.headers, json={})).json()["session"]["id"]
    assert (await api.client.get(f"/v1/loops/sessions/{sid}", headers=t.headers)).status_code == 200
    r = await api.client.post(
        f"/v1/trainer_sessions/{sid}/trainers", headers=t.headers, json={"model": TEST_MODEL, "lora_rank": 4}
    )
    assert r.status_code == 200, r.text
    ts = r.json()["trainer_server"]
    canon = (await api.client.get(f"/v1/loops/runs/{ts['id']}", headers=t.headers)).json()["run"]
    assert canon["lora_rank"] == 4 and canon["sampler"]["id"] == ts["sampling_server"]["id"]
    assert ts["base_url"] == canon["base_url"]
    r = await api.client.post(f"/v1/trainer_sessions/{sid}/samplers", headers=t.headers, json={"model": TEST_MODEL})
    smp = r.json()["sampling_server"]
    assert (await api.client.get(f"/v1/loops/samplers/{smp['id']}", headers=t.headers)).json()["sampler"][
        "base_model"
    ] == TEST_MODEL
    ck = await add_checkpoint(api.runtime, t, ts["id"], "c1")
    legacy = (
        await api.client.get(f"/v1/trainer_sessions/{sid}/trainers/{ts['id']}/checkpoints", headers=t.headers)
    ).json()
    canon = (await api.client.get(f"/v1/loops/checkpoints?run_id={ts['id']}", headers=t.headers)).json()
    assert legacy["trainer_id"] == ts["id"]
    assert [c["id"] for c in legacy["checkpoints"]] == [c["id"] for c in canon["checkpoints"]] == [ck.id]
    lf = (
        await api.client.get(
            f"/v1/trainer_sessions/{sid}/trainers/{ts['id']}/checkpoints/{ck.id}/files", headers=t.headers
        )
    ).json()
    cf = (await api.client.get(f"/v1/loops/checkpoints/{ck.id}/files", headers=t.headers)).json()
    assert lf["total_count"] == cf["total_count"] == 2
    assert [f["relative_file_name"] for f in lf["presigned_urls"]] == [
        f["relative_file_name"] for f in cf["presigned_urls"]
    ]
    r = await api.client.post("/v1/trainers/search", headers=t.headers, json={"trainer_id": ts["id"]})
    assert r.json()["trainers"] == [{"trainer_id": ts["id"], "session_id": sid, "base_model": TEST_MODEL}]
    r = await api.client.post(
        "/v1/trainers/checkpoints/search",
        headers=t.headers,
        json={"checkpoint_path": f"bt://loops:{ts['id']}/sampler_weights/c1"},
    )
    assert r.json()["checkpoint"]["id"] == ck.id
    r = await api.client.post(
        "/v1/trainers/checkpoints/search",
        headers=t.headers,
        json={"checkpoint_path": f"bt://loops:{ts['id']}/sampler_weights/zz"},
    )
    assert r.status_code == 400
    # legacy routes are tenant-isolated too
    other = await api.tenant("globex")
    r = await api.client.get(f"/v1/trainer_sessions/{sid}/trainers/{ts['id']}/checkpoints", headers=other.headers)
    assert r.status_code == 404


async def test_key_headers_and_401s(api):
    t = await api.tenant("acme")
    for headers in ({"Authorization": f"Bearer {t.key}"}, {"Authorization": f"Api-Key {t.key}"}, {"X-API-Key": t.key}):
        r = await api.client.get("/v1/loops/capabilities", headers=headers)
        assert r.status_code == 200, headers
    for headers in (
        {},
        {"Authorization": "Bearer tml-unknown-key-1234"},
        {"X-API-Key": "sk-wrong-prefix"},
        {"Authorization": "Basic abc"},
        {"Authorization": f"Bearer {t.key}x"},
    ):
        r = await api.client.get("/v1/loops/capabilities", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["code"] == "unauthenticated" and r.json()["detail"]


async def test_revocation_reaches_every_replica_within_1s(api, services, data_dir):
    t = await api.tenant("acme")
    # a second replica: its own runtime and app, same Postgres and Redis
    rt2 = build_runtime(make_settings(services, data_dir), with_backend=False)
    c2 = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rt2)), base_url="http://testserver")
    try:
        for c in (api.client, c2):  # warm both caches
            assert (await c.get("/v1/loops/capabilities", headers=t.headers)).status_code == 200
        async with api.runtime.db.transaction() as s:
            key = await identity.revoke_api_key(s, await identity.get_api_key(s, t.principal.key_id))
        await invalidate_key(api.runtime.redis, key.key_hash)
        t0 = time.monotonic()
        for c in (api.client, c2):
            while (await c.get("/v1/loops/capabilities", headers=t.headers)).status_code != 401:
                assert time.monotonic() - t0 < 1.0, "revoked key still accepted after 1 s"
                await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 1.0
    finally:
        await c2.aclose()
        await rt2.close()


async def test_rate_limit_429_with_retry_after(clean_state, services, data_dir):
    rt = build_runtime(
        make_settings(services, data_dir, rate_limit_enabled=True, rate_limit_per_second=2.0, rate_limit_burst=3),
        with_backend=False,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rt)), base_url="http://testserver")
    try:
        from tests.control_plane.conftest import make_tenant

        t = await make_tenant(rt, "acme")
        other = await make_tenant(rt, "globex")
        codes = [(await client.get("/v1/loops/capabilities", headers=t.headers)).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
        r = await client.get("/v1/loops/capabilities", headers=t.headers)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and r.json()["code"] == "rate_limited"
        # another key is unaffected
        assert (await client.get("/v1/loops/capabilities", headers=other.headers)).status_code == 200
        await asyncio.sleep(float(r.json()["retry_after_s"]) + 0.05)
        assert (await client.get("/v1/loops/capabilities", headers=t.headers)).status_code == 200
    finally:
        await client.aclose()
        await rt.close()


async def test_last_used_recorded_without_per_request_writes(api):
    from control_plane.auth.authenticator import flush_last_seen

    t = await api.tenant("acme")
    for _ in range(3):
        await api.client.get("/v1/loops/capabilities", headers=t.headers)
    async with api.runtime.db.session() as s:
        assert (await identity.get_api_key(s, t.principal.key_id)).last_used_at is None
    # each API process buffers last-used times and writes them to Redis about once a second
    await api.runtime.authenticator.flush_seen()
    assert await flush_last_seen(api.runtime.db, api.runtime.redis) == 1
    async with api.runtime.db.session() as s:
        assert (await identity.get_api_key(s, t.principal.key_id)).last_used_at is not None


async def test_a_wrong_key_is_rate_limited_like_a_right_one(clean_state, services, data_dir):
    """The same wrong key: 401 until its bucket is empty, then 429 (as a right key would be).
    Many different wrong keys from one address: database lookups are budgeted per address and
    minute, then 429 without a lookup; a key already cached still works from there."""
    from control_plane.auth.keys import generate_key
    from tests.control_plane.conftest import make_tenant

    settings = make_settings(
        services,
        data_dir,
        rate_limit_enabled=True,
        rate_limit_per_second=0.5,
        rate_limit_burst=3,
        auth_lookups_per_minute=5,
    )
    rt = build_runtime(settings, with_backend=False)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(rt)), base_url="http://testserver")
    try:
        t = await make_tenant(rt, "acme")
        assert (await client.get("/v1/loops/capabilities", headers=t.headers)).status_code == 200  # now cached
        wrong = {"Authorization": f"Bearer {generate_key()}"}
        codes = [(await client.get("/v1/loops/capabilities", headers=wrong)).status_code for _ in range(6)]
        assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429, 429], codes
        r = await client.get("/v1/loops/capabilities", headers=wrong)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert rt.authenticator.lookups == 2  # the right key and the wrong one, once each

        # distinct wrong keys: 3 more lookups fill this address's budget of 5, then 429 at once
        codes = []
        for _ in range(6):
            r = await client.get("/v1/loops/capabilities", headers={"Authorization": f"Bearer {generate_key()}"})
            codes.append(r.status_code)
        assert codes == [401, 401, 401, 429, 429, 429], codes
        assert "unknown API keys from this address" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
        assert rt.authenticator.lookups == 5
        # the cached right key is unaffected
        assert (await client.get("/v1/loops/capabilities", headers=t.headers)).status_code == 200
    finally:
        await client.aclose()
        await rt.close()
