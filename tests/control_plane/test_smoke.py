async def test_health_and_auth(api):
    r = await api.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"postgres": "ok", "redis": "ok"}
    t = await api.tenant("acme")
    r = await api.client.post("/v1/loops/sessions", headers=t.headers, json={})
    assert r.status_code == 200, r.text
    sid = r.json()["session"]["id"]
    r = await api.client.get(f"/v1/loops/sessions/{sid}", headers=t.headers)
    assert r.status_code == 200, r.text
    r = await api.client.get(f"/v1/loops/sessions/{sid}")
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
