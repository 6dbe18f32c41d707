"""Loops deployments through the management API (real Postgres, Redis, object store): the
deployment a run is created on, reuse of a live one, base checkpoints, deactivation, the
checkpoint source route, and the metrics and logs of a deployment from real request counters,
real resource samples of a real process, and a real log file."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from control_plane.metering.usage import UsageSampler
from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import WorkloadRole, WorkloadSpec
from data_plane.wire import queue as q
from tests.control_plane.conftest import OTHER_MODEL, TEST_MODEL, Api
from tests.control_plane.seed import add_checkpoint

TEN_SERIES = {
    "inference_volume",
    "concurrent_requests",
    "response_time_stats",
    "inference_volume_by_status",
    "gpu_memory_usage_bytes",
    "gpu_utilization",
    "cpu_usage",
    "cpu_memory_usage_bytes",
    "ephemeral_storage",
    "per_node_metrics",
}


async def new_run(api: Api, t, sid: str | None = None, **kw) -> dict:
    if sid is None:
        sid = (await api.client.post("/v1/loops/sessions", headers=t.headers, json={})).json()["session"]["id"]
    r = await api.client.post(
        "/v1/loops/trainers", headers=t.headers, json={"session_id": sid, "base_model": TEST_MODEL, **kw}
    )
    assert r.status_code == 200, r.text
    return r.json()["run"]


async def get(api: Api, t, path: str) -> dict:
    r = await api.client.get(path, headers=t.headers)
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_run_gets_a_deployment_and_reuse_takes_it_over(api: Api) -> None:
    t = await api.tenant("acme")
    first = await new_run(api, t, name="first", lora_rank=8)
    dep_id = first["deployment_id"]
    dep = (await get(api, t, f"/v1/loops/deployments/{dep_id}"))["deployment"]
    assert dep["status"] == {"name": "DEPLOYING", "reason": None, "detail": "DEPLOYING"}
    assert (dep["active_run_id"], dep["latest_run_id"], dep["base_model"]) == (first["id"], first["id"], TEST_MODEL)
    assert dep["base_url"] == first["base_url"]
    # the Loops SDK reads the deployment status while it waits for the trainer
    lst = (await get(api, t, "/v1/loops/deployments"))["deployments"]
    assert [d["id"] for d in lst] == [dep_id]

    # a run made with reuse_from_run_id goes on the live deployment; the first run is replaced
    second = await new_run(api, t, reuse_from_run_id=first["id"], lora_rank=4)
    assert second["deployment_id"] == dep_id
    old = (await get(api, t, f"/v1/loops/runs/{first['id']}"))["run"]
    assert old["status"] == {"name": "INACTIVE", "reason": f"replaced by run {second['id']} on deployment {dep_id}"}
    # its seq-0 op will never run there: failed at once, not left waiting
    create_rid = (await api.runtime.redis.get(q.seq_claim_key(first["id"], 0))).decode()
    fut = await api.runtime.futures.read(create_rid)
    assert fut is not None and fut.state == q.FutureState.FAILED
    dep = (await get(api, t, f"/v1/loops/deployments/{dep_id}"))["deployment"]
    assert (dep["active_run_id"], dep["latest_run_id"]) == (second["id"], second["id"])
    # what does not fit the warm deployment gets a new one: another base model or availability
    other_model = await new_run(api, t, reuse_from_run_id=second["id"], base_model=OTHER_MODEL)
    spot = await new_run(api, t, reuse_from_run_id=second["id"], availability_model="spot")
    assert len({dep_id, other_model["deployment_id"], spot["deployment_id"]}) == 3
    # the deprecated session form reuses the deployment of the session's newest run
    by_session = await new_run(api, t, reuse_from_session_id=spot["session_id"], availability_model="spot")
    assert by_session["deployment_id"] == spot["deployment_id"]
    # an unknown run, or another org's, is a clear 400 (and creates nothing)
    intruder = await api.tenant("intruder")
    isid = (await api.client.post("/v1/loops/sessions", headers=intruder.headers, json={})).json()["session"]["id"]
    for who, sid, rid in ((t, None, "run-missing"), (intruder, isid, second["id"])):
        body = {"session_id": sid or first["session_id"], "base_model": TEST_MODEL, "reuse_from_run_id": rid}
        r = await api.client.post("/v1/loops/trainers", headers=who.headers, json=body)
        assert r.status_code == 400 and r.json()["field"] == "reuse_from_run_id", r.text
    assert (await api.client.get(f"/v1/loops/deployments/{dep_id}", headers=intruder.headers)).status_code == 404
    assert (await get(api, intruder, "/v1/loops/deployments"))["deployments"] == []

    # deactivating a deployment stops it; its runs follow (the controller finishes both)
    r = await api.client.post(f"/v1/loops/deployments/{dep_id}/deactivate", headers=t.headers)
    assert r.status_code == 200 and r.json()["id"] == dep_id and r.json()["base_model"] == TEST_MODEL
    assert (await get(api, t, f"/v1/loops/deployments/{dep_id}"))["deployment"]["status"]["name"] == "STOPPED"
    # a stopped deployment is not reused
    after = await new_run(api, t, reuse_from_run_id=second["id"])
    assert after["deployment_id"] != dep_id


async def test_base_checkpoint_starts_from_an_org_checkpoint(api: Api) -> None:
    t = await api.tenant("acme")
    src = await new_run(api, t, lora_rank=8)
    ck = await add_checkpoint(api.runtime, t, src["id"], "step-3", kind="weights")
    async with api.runtime.db.transaction() as s:  # what the worker records for a rank-8 adapter
        from control_plane.db.models import Checkpoint

        row = await s.get(Checkpoint, ck.id)
        row.lora_config = {
            "rank": 8,
            "alpha": 32.0,
            "seed": 0,
            "train_attn": True,
            "train_mlp": True,
            "train_unembed": False,
        }
    path = f"bt://loops:{src['id']}/weights/step-3"
    run = await new_run(api, t, lora_rank=8, base_checkpoint=path)
    assert run["base_checkpoint"] == path
    ((_, first),) = await api.runtime.redis.xrange(q.ops_stream(run["id"]), count=1)
    env = q.OpEnvelope.from_fields(first)
    assert env.kind == q.OpKind.LOAD_WEIGHTS and b'"optimizer": false' in env.body  # adapter only, fresh optimizer
    for value, needle in (
        ("hf://org/repo@abc", "Hugging Face"),
        (f"bt://loops:{src['id']}/weights/missing", "not found"),
        ("not-a-path", "malformed"),
    ):
        r = await api.client.post(
            "/v1/loops/trainers",
            headers=t.headers,
            json={"session_id": src["session_id"], "base_model": TEST_MODEL, "base_checkpoint": value},
        )
        assert r.status_code == 400 and r.json()["field"] == "base_checkpoint" and needle in r.json()["detail"], r.text
    r = await api.client.post(
        "/v1/loops/trainers",
        headers=t.headers,
        json={"session_id": src["session_id"], "base_model": TEST_MODEL, "base_checkpoint": path, "lora_rank": 16},
    )
    assert r.status_code == 400 and "lora_rank=8" in r.json()["detail"]
    r = await api.client.post(
        "/v1/loops/trainers",
        headers=t.headers,
        json={
            "session_id": src["session_id"],
            "base_model": TEST_MODEL,
            "base_checkpoint": path,
            "lora_rank": 8,
            "reuse_from_run_id": src["id"],
        },
    )
    assert r.status_code == 400 and r.json()["field"] == "base_checkpoint"
    # and the source route says where a checkpoint's files come from
    assert (await get(api, t, f"/v1/loops/checkpoints/{ck.id}/source")) == {"source": {"kind": "s3"}}
    intruder = await api.tenant("intruder")
    assert (await api.client.get(f"/v1/loops/checkpoints/{ck.id}/source", headers=intruder.headers)).status_code == 404


async def test_metrics_from_data_plane_requests_and_process_samples(api: Api, data_dir: Path) -> None:
    t = await api.tenant("acme")
    run = await new_run(api, t, lora_rank=8)
    dep_id = run["deployment_id"]
    h = {**t.headers, "X-Run-Id": run["id"]}
    for _ in range(2):  # not ready yet: 503
        assert (await api.client.get(f"{run['base_url']}/health", headers=h)).status_code == 503
    r = await api.client.post(
        f"{run['base_url']}/init_trainer_server",
        json={"seq_id": 1, "lora_rank": 8},
        headers={**h, "Idempotency-Key": "m-1"},
    )
    assert r.status_code == 202
    assert (
        await api.client.post(
            f"{run['base_url']}/save_state", json={"seq_id": 2, "name": "../x"}, headers={**h, "Idempotency-Key": "m-2"}
        )
    ).status_code == 400
    await api.runtime.meter.flush()

    # resource samples of a real process standing in for the deployment's trainer
    backend = LocalProcessBackend(data_dir / "workers")
    hog = "x = bytearray(64 * 1024 * 1024); import time\nwhile True: sum(range(10000))"
    await backend.ensure(
        WorkloadSpec(dep_id, WorkloadRole.TRAINER, t.org_id, None, TEST_MODEL, command=[sys.executable, "-c", hog])
    )
    api.runtime.backend = backend
    try:
        sampler = UsageSampler(api.runtime)
        await api.runtime.redis.hset(
            q.worker_state_key(dep_id), "gpus", '{"0": {"memory_bytes": 1000, "utilization": 0.5}}'
        )
        await asyncio.sleep(0.5)
        assert await sampler.sample() == 1
        await asyncio.sleep(0.3)
        assert await sampler.sample() == 1
    finally:
        api.runtime.backend = None
        await backend.close()

    m = await api.client.post(f"/v1/loops/deployments/{dep_id}/metrics", headers=t.headers, json={})
    assert m.status_code == 200, m.text
    assert m.json()["deployment_id"] == dep_id
    metrics = m.json()["metrics"]
    assert set(metrics) == TEN_SERIES
    assert sum(p["value"] for p in metrics["inference_volume"]) == 4
    by = metrics["inference_volume_by_status"]
    assert (sum(p["status_2xx"] for p in by), sum(p["status_4xx"] for p in by), sum(p["status_5xx"] for p in by)) == (
        1,
        1,
        2,
    )
    assert all(p["value"] >= 1 for p in metrics["concurrent_requests"])
    assert all(p["p50"] is not None and p["p50"] <= p["p99"] for p in metrics["response_time_stats"])
    mem = [p["value"] for p in metrics["cpu_memory_usage_bytes"]]
    assert mem and 60 * 2**20 < mem[-1] < 2**31, mem  # the process's 64 MiB, plus an interpreter
    assert metrics["cpu_usage"] and all(p["value"] >= 0 for p in metrics["cpu_usage"])
    assert (
        metrics["gpu_memory_usage_bytes"]["0"][0]["value"] == 1000
        and metrics["gpu_utilization"]["0"][0]["value"] == 0.5
    )
    assert metrics["ephemeral_storage"]["usage_bytes"] and metrics["per_node_metrics"][0]["node_id"]
    # a rate per minute instead of a count per step; validation
    now = int(time.time() * 1000)
    r = await api.client.post(
        f"/v1/loops/deployments/{dep_id}/metrics",
        headers=t.headers,
        json={
            "start_epoch_millis": now - 600_000,
            "end_epoch_millis": now + 60_000,
            "step_seconds": 600,
            "time_divisor_seconds": 60,
        },
    )
    assert sum(p["value"] for p in r.json()["metrics"]["inference_volume"]) == pytest.approx(0.4)
    for body, field in (
        ({"start_epoch_millis": 2000, "end_epoch_millis": 1000}, "start_epoch_millis"),
        ({"step_seconds": 30}, "step_seconds"),
        ({"time_divisor_seconds": 0}, "time_divisor_seconds"),
    ):
        r = await api.client.post(f"/v1/loops/deployments/{dep_id}/metrics", headers=t.headers, json=body)
        assert r.status_code == 400 and r.json()["field"] == field
    intruder = await api.tenant("intruder")
    assert (
        await api.client.post(f"/v1/loops/deployments/{dep_id}/metrics", headers=intruder.headers, json={})
    ).status_code == 404


async def test_logs_of_the_deployments_trainer(api: Api, data_dir: Path) -> None:
    t = await api.tenant("acme")
    run = await new_run(api, t)
    dep_id = run["deployment_id"]
    log = data_dir / "workers" / f"trainer-{dep_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now().astimezone()
    stamp = now.strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    log.write_text(
        f"{stamp} INFO openloops.trainer: base model loaded\n"
        f"{stamp} INFO openloops.trainer: seq 1 forward_backward done in 0.1s (request req-abc)\n"
        f"{stamp} ERROR openloops.trainer: seq 2 optim_step failed (request req-def): boom\n"
        "Traceback (most recent call last):\n"
        f"{stamp} WARNING openloops.trainer: redis error; retrying\n"
    )
    url = f"/v1/loops/deployments/{dep_id}/logs"
    logs = (await get(api, t, url))["logs"]
    # newest first; a message keeps its logger's name
    assert [x["message"] for x in logs][:2] == [
        "openloops.trainer: redis error; retrying",
        "Traceback (most recent call last):",
    ]
    assert len(logs) == 5 and all(x["timestamp"].isdigit() and x["replica"] for x in logs)
    assert {x["request_id"] for x in logs} >= {"req-abc", "req-def"}
    asc = (await get(api, t, f"{url}?direction=asc&limit=2"))["logs"]
    assert [x["message"] for x in asc] == [
        "openloops.trainer: base model loaded",
        "openloops.trainer: seq 1 forward_backward done in 0.1s (request req-abc)",
    ]
    errors = (await get(api, t, f"{url}?min_level=ERROR"))["logs"]
    assert {x["level"] for x in errors} == {"ERROR"} and len(errors) == 2  # the traceback belongs to its record
    past = int(time.time() * 1000) - 3_600_000
    assert (await get(api, t, f"{url}?start_epoch_millis={past - 60_000}&end_epoch_millis={past}"))["logs"] == []
    for q_, field in (
        ("direction=up", "direction"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("min_level=LOUD", "min_level"),
        (f"start_epoch_millis={past}&end_epoch_millis={past + 8 * 86_400_000}", "start_epoch_millis"),
    ):
        r = await api.client.get(f"{url}?{q_}", headers=t.headers)
        assert r.status_code == 400 and r.json()["field"] == field, (q_, r.text)
    intruder = await api.tenant("intruder")
    assert (await api.client.get(url, headers=intruder.headers)).status_code == 404
