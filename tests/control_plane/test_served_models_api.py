"""Served models through the API (real Postgres, Redis, object store): deploy and its refusals,
list with pages, get, deactivate, metrics, the OpenAI-compatible routes' answers before a
server exists (or after it is gone), another org's key, a served checkpoint that may not be
deleted, and the admin CLI. Serving through a real vLLM server is tests/e2e/test_served_models.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from sqlalchemy import update

from control_plane.db.models import ServedModel
from control_plane.scheduler.ports import free_port
from tests.control_plane.conftest import OTHER_MODEL, TEST_MODEL, Api
from tests.control_plane.seed import add_checkpoint
from tests.control_plane.test_loops_deployments import TEN_SERIES, new_run


async def deploy(api: Api, t, ids: list[str], name: str = "my-model", **kw):
    return await api.client.post(
        "/v1/loops/checkpoints/deploy", headers=t.headers, json={"checkpoint_ids": ids, "model_name": name, **kw}
    )


async def two_checkpoints(api: Api, t) -> tuple[str, list]:
    run = await new_run(api, t)
    a = await add_checkpoint(api.runtime, t, run["id"], "step-10")
    b = await add_checkpoint(api.runtime, t, run["id"], "step-20")
    return run["id"], [a, b]


async def test_deploy_two_checkpoints_then_get_list_and_deactivate(api: Api) -> None:
    t = await api.tenant("acme")
    _, (a, b) = await two_checkpoints(api, t)
    r = await deploy(api, t, [a.id, b.id], instance_type_id="cpu-1", hf_secret_name="hf-token")
    assert r.status_code == 200, r.text
    body = r.json()
    sm = body["served_model"]
    assert body["model_id"] == body["deployment_id"] == sm["id"]
    assert body["base_url"] == sm["base_url"]
    assert sm["base_url"].endswith(f"/v1/loops/served_models/{sm['id']}/openai/v1")
    assert [(c["checkpoint_id"], c["model"]) for c in sm["checkpoints"]] == [(a.id, "step-10"), (b.id, "step-20")]
    assert (sm["name"], sm["base_model"], sm["status"]["name"], sm["verification"]) == (
        "my-model",
        TEST_MODEL,
        "DEPLOYING",
        "pending",
    )
    assert (sm["instance_type_id"], sm["hf_secret_name"]) == ("cpu-1", "hf-token")

    got = (await api.client.get(f"/v1/loops/served_models/{sm['id']}", headers=t.headers)).json()["served_model"]
    assert got["checkpoints"] == sm["checkpoints"]
    listed = (await api.client.get("/v1/loops/served_models", headers=t.headers)).json()
    assert [x["id"] for x in listed["served_models"]] == [sm["id"]] and listed["next_page_token"] is None

    # the OpenAI model list names each checkpoint and the base model
    models = (await api.client.get(f"{sm['base_url']}/models", headers=t.headers)).json()
    assert [m["id"] for m in models["data"]] == ["step-10", "step-20", TEST_MODEL]
    # still starting: a completion is a 503 the client retries
    r = await api.client.post(
        f"{sm['base_url']}/chat/completions", headers=t.headers, json={"model": "step-10", "messages": []}
    )
    assert r.status_code == 503 and "DEPLOYING" in r.json()["detail"]

    r = await api.client.post(f"/v1/loops/served_models/{sm['id']}/deactivate", headers=t.headers)
    assert r.status_code == 200 and r.json()["served_model"]["status"]["name"] == "DEACTIVATING"
    r = await api.client.post(f"{sm['base_url']}/completions", headers=t.headers, json={"model": "step-10"})
    assert r.status_code == 410 and r.json()["code"] == "gone"


async def test_deploy_refuses_what_cannot_be_served(api: Api) -> None:
    t = await api.tenant("acme")
    run_id, (a, _b) = await two_checkpoints(api, t)
    weights = await add_checkpoint(api.runtime, t, run_id, "state", kind="weights")
    other_run = await new_run(api, t, base_model=OTHER_MODEL)
    other_base = await add_checkpoint(api.runtime, t, other_run["id"], "x")
    same_name = await add_checkpoint(api.runtime, t, other_run["id"], "step-10")
    second_run = await new_run(api, t)
    twin = await add_checkpoint(api.runtime, t, second_run["id"], "step-10")
    cases = [
        ([], "checkpoint_ids"),
        ([a.id, a.id], "more than once"),
        ([weights.id], "only sampler_weights checkpoints deploy"),
        ([a.id, other_base.id], "different base models"),
        ([a.id, twin.id], "both named 'step-10'"),
    ]
    for ids, words in cases:
        r = await deploy(api, t, ids)
        assert r.status_code == 400, (ids, r.text)
        assert words in r.json()["detail"], r.json()
    assert same_name.base_model == OTHER_MODEL
    r = await deploy(api, t, [a.id], name="")
    assert r.status_code == 400 and r.json()["field"] == "model_name"
    r = await deploy(api, t, [a.id], hf_secret_name="Not A Secret Name")
    assert r.status_code == 400 and r.json()["field"] == "hf_secret_name"
    r = await deploy(api, t, [a.id, "ckpt-nope"])
    assert r.status_code == 404 and "ckpt-nope" in r.json()["detail"]
    # nothing was written by any of them
    assert (await api.client.get("/v1/loops/served_models", headers=t.headers)).json()["served_models"] == []


async def test_pages_newest_first(api: Api) -> None:
    t = await api.tenant("acme")
    _, (a, _b) = await two_checkpoints(api, t)
    ids = [(await deploy(api, t, [a.id], name=f"m{i}")).json()["model_id"] for i in range(5)]
    seen, token = [], None
    while True:
        params = {"limit": 2, **({"page_token": token} if token else {})}
        page = (await api.client.get("/v1/loops/served_models", headers=t.headers, params=params)).json()
        seen += [x["id"] for x in page["served_models"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == ids[::-1]
    r = await api.client.get("/v1/loops/served_models", headers=t.headers, params={"page_token": "garbage"})
    assert r.status_code == 400 and r.json()["field"] == "page_token"


async def test_another_org_gets_404_on_every_route(api: Api) -> None:
    t, other = await api.tenant("acme"), await api.tenant("globex")
    _, (a, _b) = await two_checkpoints(api, t)
    sm = (await deploy(api, t, [a.id])).json()["served_model"]
    base = sm["base_url"]
    calls = [
        ("GET", f"/v1/loops/served_models/{sm['id']}", None),
        ("POST", f"/v1/loops/served_models/{sm['id']}/deactivate", None),
        ("POST", f"/v1/loops/served_models/{sm['id']}/metrics", {}),
        ("GET", f"{base}/models", None),
        ("POST", f"{base}/chat/completions", {"model": "step-10", "messages": []}),
        ("POST", f"{base}/completions", {"model": "step-10", "prompt": "hi"}),
    ]
    for method, path, body in calls:
        r = await api.client.request(method, path, headers=other.headers, json=body)
        assert r.status_code == 404, (path, r.text)
    r = await deploy(api, other, [a.id])  # someone else's checkpoint
    assert r.status_code == 404
    assert (await api.client.get("/v1/loops/served_models", headers=other.headers)).json()["served_models"] == []
    # and no key at all is a 401
    assert (await api.client.get(f"{base}/models")).status_code == 401


async def test_model_names_and_a_server_that_is_gone(api: Api) -> None:
    t = await api.tenant("acme")
    _, (a, b) = await two_checkpoints(api, t)
    sm = (await deploy(api, t, [a.id, b.id])).json()["served_model"]
    # pretend it came up on a port where nothing listens any more
    async with api.runtime.db.transaction() as s:
        await s.execute(
            update(ServedModel)
            .where(ServedModel.id == sm["id"])
            .values(status="ACTIVE", endpoint=f"http://127.0.0.1:{free_port()}")
        )
    url = f"{sm['base_url']}/chat/completions"
    r = await api.client.post(url, headers=t.headers, json={"model": "nope", "messages": []})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = await api.client.post(url, headers=t.headers, json={"messages": []})  # two checkpoints: name one
    assert r.status_code == 400 and "step-10" in r.json()["detail"]
    r = await api.client.post(url, headers=t.headers, content=b"{not json")
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = await api.client.post(url, headers=t.headers, json={"model": "step-10", "stream": "yes"})
    assert r.status_code == 400 and r.json()["field"] == "stream"
    r = await api.client.post(url, headers=t.headers, json={"model": "step-20", "messages": []})
    assert r.status_code == 503 and "not reachable" in r.json()["detail"]
    # the requests were metered (flushed to the request buckets), by status class
    await api.runtime.meter.flush()
    m = (await api.client.post(f"/v1/loops/served_models/{sm['id']}/metrics", headers=t.headers, json={})).json()
    assert m["deployment_id"] == sm["id"] and set(m["metrics"]) == TEN_SERIES
    by = m["metrics"]["inference_volume_by_status"]
    counts = tuple(sum(p[f"status_{c}"] for p in by) for c in ("2xx", "4xx", "5xx"))
    assert counts == (0, 4, 1), counts  # 404, three 400s; the 503


async def test_a_served_checkpoint_is_not_deleted(api: Api) -> None:
    t = await api.tenant("acme")
    run_id, (a, _b) = await two_checkpoints(api, t)
    sm = (await deploy(api, t, [a.id])).json()["served_model"]
    path = f"/api/v1/training_runs/{run_id}/checkpoints/sampler_weights/step-10"
    r = await api.client.delete(path, headers=t.headers)
    assert r.status_code == 409 and sm["id"] in r.json()["detail"]
    await api.client.post(f"/v1/loops/served_models/{sm['id']}/deactivate", headers=t.headers)
    async with api.runtime.db.transaction() as s:  # the controller finishes a deactivation
        await s.execute(update(ServedModel).where(ServedModel.id == sm["id"]).values(status="INACTIVE"))
    assert (await api.client.delete(path, headers=t.headers)).status_code == 200


async def test_admin_cli_serves_checkpoints(api: Api) -> None:
    t = await api.tenant("acme")
    _, (a, b) = await two_checkpoints(api, t)
    st = api.runtime.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLOOPS_")}
    env.update(
        OPENLOOPS_DATABASE_URL=st.database_url or "",
        OPENLOOPS_DATA_DIR=str(st.data_dir),
        OPENLOOPS_MODEL_CATALOG_PATH=str(st.model_catalog_path),
    )
    cmd = [sys.executable, "-m", "control_plane.cli.main", "admin", "served-models"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, check=False)

    out = await asyncio.to_thread(cli, "create", a.id, b.id, "--org", t.org_id, "--name", "cli-model", "--json")
    assert out.returncode == 0, out.stderr
    assert '"checkpoints": "step-10 (' in out.stdout and "/openai/v1" in out.stdout
    listed = await asyncio.to_thread(cli, "list", "--org", t.org_id, "--json")
    assert listed.returncode == 0 and "cli-model" in listed.stdout, listed.stderr
    bad = await asyncio.to_thread(cli, "create", "ckpt-nope", "--org", t.org_id, "--name", "x")
    assert bad.returncode == 1 and "ckpt-nope" in bad.stderr
