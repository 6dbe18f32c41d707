"""Happy and error paths of every /v1/loops route (real Postgres, Redis, object store)."""

from __future__ import annotations

import httpx

from tests.control_plane.conftest import OTHER_MODEL, TEST_MODEL
from tests.control_plane.seed import add_checkpoint


async def new_session(api, t) -> str:
    r = await api.client.post("/v1/loops/sessions", headers=t.headers, json={})
    assert r.status_code == 200, r.text
    return r.json()["session"]["id"]


async def new_run(api, t, sid, **kw):
    r = await api.client.post(
        "/v1/loops/runs", headers=t.headers, json={"session_id": sid, "base_model": TEST_MODEL, **kw}
    )
    assert r.status_code == 200, r.text
    return r.json()["run"]


async def test_sessions(api):
    t = await api.tenant("acme")
    sid = await new_session(api, t)
    r = await api.client.get(f"/v1/loops/sessions/{sid}", headers=t.headers)
    assert r.json()["session"]["id"] == sid
    r = await api.client.get("/v1/loops/sessions/nope", headers=t.headers)
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = await api.client.post("/v1/loops/sessions", headers=t.headers, json={"training_project_id": "proj-missing"})
    assert r.status_code == 400 and r.json()["field"] == "training_project_id"


async def test_create_run_shape_and_initial_status(api):
    t = await api.tenant("acme")
    sid = await new_session(api, t)
    run = await new_run(api, t, sid, lora_rank=8, seed=3, unknown_field="ignored")
    for field in ("id", "session_id", "base_model", "base_url", "created_at", "sampler"):
        assert field in run
    assert run["session_id"] == sid and run["base_model"] == TEST_MODEL
    # dedicated: the run executes on a deployment of its own, whose trainer speaks at base_url
    assert run["deployment_id"].startswith("dep-")
    assert run["base_url"] == f"http://testserver/v1/loops/deployments/{run['deployment_id']}/trainer"
    assert run["status"]["name"] == "DEPLOYING"  # nothing runs it yet: never faked ACTIVE
    smp = run["sampler"]
    for field in ("id", "base_url", "base_model", "created_at", "model_id", "deployment_id", "status"):
        assert field in smp
    assert smp["status"]["name"] == "DEPLOYING"
    assert run["lora_rank"] == 8 and run["seed"] == 3 and run["max_seq_len"] == 512
    # a seq-0 create op was handed to the run's trainer queue
    from data_plane.wire.queue import ops_stream

    entries = await api.runtime.redis.xrange(ops_stream(run["id"]))
    assert len(entries) == 1 and entries[0][1][b"kind"] == b"create" and entries[0][1][b"seq_id"] == b"0"
    got = await api.client.get(f"/v1/loops/runs/{run['id']}", headers=t.headers)
    assert got.status_code == 200 and got.json()["run"]["sampler"]["id"] == smp["id"]
    # the encoded answer goes out with its JSON headers and the middleware's request id
    assert got.headers["content-type"] == "application/json" and int(got.headers["content-length"]) == len(got.content)
    assert len(got.headers["x-request-id"]) == 32


async def test_create_run_validation(api):
    t = await api.tenant("acme")
    sid = await new_session(api, t)
    cases = [
        ({"session_id": sid}, "base_model"),
        ({"session_id": sid, "base_model": "nope/model"}, "base_model"),
        ({"session_id": sid, "base_model": TEST_MODEL, "max_seq_len": 100000}, "max_seq_len"),
        ({"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 0}, "lora_rank"),
        ({"session_id": sid, "base_model": TEST_MODEL, "lora_rank": "big"}, "lora_rank"),
        ({"session_id": sid, "base_model": TEST_MODEL, "scale_down_delay_seconds": 0}, "scale_down_delay_seconds"),
        ({"session_id": sid, "base_model": TEST_MODEL, "availability_model": "cheap"}, "availability_model"),
        ({"session_id": sid, "base_model": TEST_MODEL, "replicas": 0}, "replicas"),
        (
            {"session_id": sid, "base_model": TEST_MODEL, "activation_checkpointing": "always"},
            "activation_checkpointing",
        ),
        ({"session_id": sid, "base_model": TEST_MODEL, "activation_checkpointing": True}, "activation_checkpointing"),
        ({"session_id": sid, "base_model": TEST_MODEL, "replicas": 9}, "replicas"),  # run_max_replicas 8
        ({"session_id": sid, "base_model": TEST_MODEL, "path": "s3://x"}, "path"),
        ({"session_id": sid, "base_model": TEST_MODEL, "path": "bt://loops:run-x/weights/missing"}, "path"),
        ({"session_id": "missing", "base_model": TEST_MODEL}, None),
    ]
    for body, field in cases:
        r = await api.client.post("/v1/loops/runs", headers=t.headers, json=body)
        if field is None:
            assert r.status_code == 404, (body, r.text)
        else:
            assert r.status_code == 400, (body, r.text)
            assert r.json()["field"] == field, (body, r.json())
            assert r.json()["detail"]
    # nothing half-written: no run rows exist
    r = await api.client.get("/v1/loops/runs", headers=t.headers)
    assert r.status_code == 200, r.text
    assert r.json()["runs"] == []
    r = await api.client.post("/v1/loops/runs", headers=t.headers, content=b"{not json")
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")


async def test_trainer_only_run_and_path_resume(api):
    t = await api.tenant("acme")
    sid = await new_session(api, t)
    r = await api.client.post(
        "/v1/loops/trainers", headers=t.headers, json={"session_id": sid, "base_model": TEST_MODEL}
    )
    assert r.status_code == 200 and r.json()["run"]["sampler"] is None
    rid = r.json()["run"]["id"]
    await add_checkpoint(api.runtime, t, rid, "state-1", kind="weights")
    run = await new_run(api, t, sid, path=f"bt://loops:{rid}/weights/state-1")
    from data_plane.wire.queue import ops_stream

    entries = await api.runtime.redis.xrange(ops_stream(run["id"]))
    assert entries[0][1][b"kind"] == b"load_weights"
    r = await api.client.post(
        "/v1/loops/runs",
        headers=t.headers,
        json={"session_id": sid, "base_model": TEST_MODEL, "path": f"bt://loops:{rid}/sampler_weights/state-1"},
    )
    assert r.status_code == 400 and r.json()["field"] == "path"


async def test_activation_checkpointing_extension_field(api):
    """A run's activation_checkpointing (openloops extension) is stored on the run, rides in its
    seq-0 op (create, and load_weights for a resume) and comes back in every run answer; a run
    without one answers null (the server's default)."""
    import json

    from data_plane.wire.queue import ops_stream

    t = await api.tenant("acme")
    sid = await new_session(api, t)
    r = await api.client.post(
        "/v1/loops/trainers",
        headers=t.headers,
        json={"session_id": sid, "base_model": TEST_MODEL, "activation_checkpointing": "on"},
    )
    assert r.status_code == 200, r.text
    on = r.json()["run"]
    assert on["activation_checkpointing"] == "on"
    await add_checkpoint(api.runtime, t, on["id"], "state-1", kind="weights")
    off = await new_run(api, t, sid, path=f"bt://loops:{on['id']}/weights/state-1", activation_checkpointing="off")
    default = await new_run(api, t, sid)
    assert off["activation_checkpointing"] == "off" and default["activation_checkpointing"] is None
    for run, kind, mode in ((on, b"create", "on"), (off, b"load_weights", "off"), (default, b"create", None)):
        entries = await api.runtime.redis.xrange(ops_stream(run["id"]))
        assert entries[0][1][b"seq_id"] == b"0" and entries[0][1][b"kind"] == kind
        assert json.loads(entries[0][1][b"body"])["activation_checkpointing"] == mode
        got = await api.client.get(f"/v1/loops/runs/{run['id']}", headers=t.headers)
        assert got.json()["run"]["activation_checkpointing"] == mode
    listed = (await api.client.get("/v1/loops/runs", headers=t.headers)).json()["runs"]
    assert {x["id"]: x["activation_checkpointing"] for x in listed} == {
        on["id"]: "on",
        off["id"]: "off",
        default["id"]: None,
    }
    r = await api.client.post(
        "/v1/loops/trainers",
        headers=t.headers,
        json={"session_id": sid, "base_model": TEST_MODEL, "activation_checkpointing": "sometimes"},
    )
    assert r.status_code == 400 and r.json()["field"] == "activation_checkpointing", r.text
    assert len((await api.client.get("/v1/loops/runs", headers=t.headers)).json()["runs"]) == 3


async def test_list_runs_filters_scope_and_order(api):
    t = await api.tenant("acme", email="a@acme.io")
    t2 = await api.tenant("acme", email="b@acme.io")
    sid = await new_session(api, t)
    sid2 = await new_session(api, t2)
    r1 = await new_run(api, t, sid)
    r2 = await new_run(api, t, sid)
    r3 = await new_run(api, t2, sid2)
    runs = (await api.client.get("/v1/loops/runs", headers=t.headers)).json()["runs"]
    assert [x["id"] for x in runs] == [r2["id"], r1["id"]]  # newest first, own only
    runs = (await api.client.get("/v1/loops/runs?scope=org", headers=t.headers)).json()["runs"]
    assert {x["id"] for x in runs} == {r1["id"], r2["id"], r3["id"]}
    runs = (await api.client.get(f"/v1/loops/runs?run_id={r1['id']}", headers=t.headers)).json()["runs"]
    assert [x["id"] for x in runs] == [r1["id"]]
    runs = (await api.client.get(f"/v1/loops/runs?base_model={OTHER_MODEL}", headers=t.headers)).json()["runs"]
    assert runs == []
    r = await api.client.get("/v1/loops/runs?scope=everyone", headers=t.headers)
    assert r.status_code == 400 and r.json()["field"] == "scope"


async def test_run_deactivate(api):
    t = await api.tenant("acme")
    sid = await new_session(api, t)
    run = await new_run(api, t, sid)
    r = await api.client.post(f"/v1/loops/runs/{run['id']}/deactivate", headers=t.headers)
    assert r.status_code == 200
    assert r.json() == {"id": run["id"], "base_model": TEST_MODEL, "user": {"email": "u@example.com"}}
    got = (await api.client.get(f"/v1/loops/runs/{run['id']}", headers=t.headers)).json()["run"]
    assert got["status"]["name"] == "DEACTIVATING" and got["sampler"]["status"]["name"] == "DEACTIVATING"
    # the run was what its deployment executed: the deployment's trainer stops too
    dep = (await api.client.get(f"/v1/loops/deployments/{run['deployment_id']}", headers=t.headers)).json()[
        "deployment"
    ]
    assert dep["status"]["name"] == "STOPPED" and dep["status"]["detail"] == "DEACTIVATING"


async def test_samplers(api):
    t = await api.tenant("acme")
    sid = await new_session(api, t)
    run = await new_run(api, t, sid)
    r = await api.client.post(
        "/v1/loops/samplers", headers=t.headers, json={"session_id": sid, "base_model": TEST_MODEL}
    )
    assert r.status_code == 200, r.text
    standalone = r.json()["sampler"]
    assert standalone["status"]["name"] == "DEPLOYING" and standalone["run_id"] is None
    r = await api.client.post("/v1/loops/samplers", headers=t.headers, json={"session_id": sid, "run_id": run["id"]})
    assert r.status_code == 200 and r.json()["sampler"]["base_model"] == TEST_MODEL
    paired = r.json()["sampler"]
    assert paired["id"] == run["sampler"]["id"]  # a run's paired sampler is created once (idempotent)
    assert paired["base_url"] == f"http://testserver/v1/loops/samplers/{paired['id']}/sync"
    ck = await add_checkpoint(api.runtime, t, run["id"], "s1")
    r = await api.client.post(
        "/v1/loops/samplers",
        headers=t.headers,
        json={"session_id": sid, "model_path": f"bt://loops:{run['id']}/sampler_weights/s1"},
    )
    assert r.status_code == 200 and r.json()["sampler"]["model_path"].endswith("/s1")
    assert ck.id
    lst = (await api.client.get("/v1/loops/samplers", headers=t.headers)).json()["samplers"]
    ids = [x["id"] for x in lst]
    assert ids[0] == r.json()["sampler"]["id"] and paired["id"] in ids and standalone["id"] in ids
    assert run["sampler"]["id"] in ids and len(ids) == 3
    got = await api.client.get(f"/v1/loops/samplers/{standalone['id']}", headers=t.headers)
    assert got.json()["sampler"]["id"] == standalone["id"]
    for body, field in (
        ({"session_id": sid}, "base_model"),
        ({"session_id": sid, "base_model": OTHER_MODEL}, "base_model"),  # not sampleable
        ({"session_id": sid, "run_id": "run-missing"}, "run_id"),
        ({"session_id": sid, "model_path": "bt://loops:x/sampler_weights/nope"}, "model_path"),
        ({"session_id": sid, "base_model": TEST_MODEL, "max_seq_length": 0}, "max_seq_length"),
    ):
        r = await api.client.post("/v1/loops/samplers", headers=t.headers, json=body)
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)
    r = await api.client.get("/v1/loops/samplers/smp-missing", headers=t.headers)
    assert r.status_code == 404


async def test_checkpoints_list_validate_files(api):
    t = await api.tenant("acme")
    sid = await new_session(api, t)
    run = await new_run(api, t, sid)
    c1 = await add_checkpoint(api.runtime, t, run["id"], "step-1")
    files = [(f"shard-{i:02d}.bin", 10 + i) for i in range(5)]
    c2 = await add_checkpoint(api.runtime, t, run["id"], "step-2", files=files)
    r = await api.client.get(f"/v1/loops/checkpoints?run_id={run['id']}", headers=t.headers)
    cks = r.json()["checkpoints"]
    assert [c["id"] for c in cks] == [c2.id, c1.id]
    c = cks[0]
    for field in (
        "checkpoint_id",
        "created_at",
        "checkpoint_type",
        "base_model",
        "lora_adapter_config",
        "size_bytes",
        "id",
        "run_id",
        "target",
    ):
        assert field in c
    assert c["checkpoint_id"] == "step-2" and c["target"] == "sampler" and c["size_bytes"] == sum(s for _, s in files)
    r = await api.client.get(f"/v1/loops/checkpoints?base_model={TEST_MODEL}", headers=t.headers)
    assert len(r.json()["checkpoints"]) == 2 and r.headers["content-type"] == "application/json"
    r = await api.client.get(
        f"/v1/loops/checkpoints?checkpoint_path=bt://loops:{run['id']}/sampler_weights/step-1", headers=t.headers
    )
    assert [x["id"] for x in r.json()["checkpoints"]] == [c1.id]
    for q in ("", f"?run_id={run['id']}&base_model={TEST_MODEL}", "?checkpoint_path=garbage"):
        r = await api.client.get(f"/v1/loops/checkpoints{q}", headers=t.headers)
        assert r.status_code == 400, q
    ok = await api.client.post(
        "/v1/loops/checkpoints/validate",
        headers=t.headers,
        json={"checkpoint_path": f"bt://loops:{run['id']}/sampler_weights/step-1"},
    )
    assert ok.status_code == 200 and ok.json() == {}
    for p in (
        "tinker://x/y",
        f"bt://loops:{run['id']}/sampler_weights/missing",
        f"bt://loops:{run['id']}/weights/step-1",
        "bt://loops:a/b",
    ):
        r = await api.client.post("/v1/loops/checkpoints/validate", headers=t.headers, json={"checkpoint_path": p})
        assert r.status_code == 400 and r.json()["field"] == "checkpoint_path", p
    # files: offset pagination with per-file signed URLs that really download
    r = await api.client.get(f"/v1/loops/checkpoints/{c2.id}/files?page_size=2", headers=t.headers)
    body = r.json()
    assert body["total_count"] == 5 and body["next_page_token"] == 2
    assert [f["relative_file_name"] for f in body["presigned_urls"]] == ["shard-00.bin", "shard-01.bin"]
    seen = [f["relative_file_name"] for f in body["presigned_urls"]]
    token = body["next_page_token"]
    while token is not None:
        page = (
            await api.client.get(
                f"/v1/loops/checkpoints/{c2.id}/files?page_size=2&page_token={token}", headers=t.headers
            )
        ).json()
        seen += [f["relative_file_name"] for f in page["presigned_urls"]]
        token = page["next_page_token"]
    assert seen == [f for f, _ in files]
    f0 = body["presigned_urls"][0]
    assert f0["size_bytes"] == 10 and f0["node_rank"] == 0 and f0["last_modified"]
    dl = await api.client.get(f0["url"].replace("http://testserver", ""))
    assert dl.status_code == 200 and dl.content == b"x" * 10
    bad = await api.client.get(f0["url"].replace("http://testserver", "")[:-3] + "AAA")
    assert bad.status_code == 403
    for q in ("page_size=0", "page_size=5000", "page_token=-1", "page_size=abc"):
        r = await api.client.get(f"/v1/loops/checkpoints/{c2.id}/files?{q}", headers=t.headers)
        assert r.status_code == 400, q
    r = await api.client.get("/v1/loops/checkpoints/ckpt-missing/files", headers=t.headers)
    assert r.status_code == 404


async def test_capabilities(api):
    t = await api.tenant("acme")
    r = await api.client.get("/v1/loops/capabilities", headers=t.headers)
    models = {m["model_name"]: m for m in r.json()["supported_models"]}
    assert models[TEST_MODEL]["max_context_length"] == 512
    assert models[OTHER_MODEL]["sampleable"] is False and models[TEST_MODEL]["supports_vision_language"] is False


async def test_http_behaviour(api):
    r = await api.client.get("/docs/openapi.json")
    assert r.status_code == 200 and "/v1/loops/runs" in r.json()["paths"]
    r = await api.client.get("/docs/swagger")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    r = await api.client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["code"] == "not_found" and r.json()["request_id"]
    r = await api.client.get("/healthz", headers={"X-Request-ID": "abc123"})
    assert r.headers["x-request-id"] == "abc123"
    m = await api.client.get("/metrics")
    assert "openloops_http_requests_total" in m.text and 'route="/healthz"' in m.text
    t = await api.tenant("acme")
    big = b'{"session_id": "' + b"x" * (api.runtime.settings.request_body_limit_bytes + 10) + b'"}'
    r = await api.client.post("/v1/loops/runs", headers={**t.headers, "content-type": "application/json"}, content=big)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert isinstance(api.client, httpx.AsyncClient)


def test_activation_checkpointing_modes_agree():
    """The Loops field, the server setting and the worker's modes are one list."""
    from typing import get_args

    from control_plane.api.loops.schemas import ActivationCheckpointing
    from control_plane.settings import Settings
    from data_plane.wire.op_bodies import ACTIVATION_CHECKPOINTING_MODES

    literal = get_args(ActivationCheckpointing)[0]
    assert get_args(literal) == ACTIVATION_CHECKPOINTING_MODES
    assert (
        get_args(Settings.model_fields["trainer_activation_checkpointing"].annotation) == ACTIVATION_CHECKPOINTING_MODES
    )
