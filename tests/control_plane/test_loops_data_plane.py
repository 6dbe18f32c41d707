"""The Loops data planes at the API level (real Postgres and Redis, no worker): addressing and
error-header rules, idempotency keys, seq ids and client epochs, long polls, the sampler's
routing headers and status route. Where a test needs an op's result it writes the future the
way a trainer worker does (data_plane/wire/queue.py); the SDK against real workers is in
tests/loops."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from control_plane.api.app import create_app
from control_plane.db.models import Run
from control_plane.runtime import build_runtime
from control_plane.sampling.loops_plane import LoopsSamplerPlane, PolicyVersionBehind, Routing
from control_plane.training.queue import TrainerQueue
from data_plane.wire import queue as q
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.queue import Dialect, FutureResult, OpEnvelope, OpKind
from tests.control_plane.conftest import TEST_MODEL, Api, make_settings
from tests.control_plane.seed import add_checkpoint

ACCEPT = {"X-Baseten-Accept-Error": "1"}


@pytest.fixture
async def api(clean_state: None, services, data_dir: Path) -> AsyncIterator[Api]:
    """The API with short long-polls (0.3 s)."""
    runtime = build_runtime(make_settings(services, data_dir, future_poll_timeout_seconds=0.3), with_backend=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)), base_url="http://testserver"
    ) as c:
        yield Api(runtime, c)
    await runtime.close()


async def new_run(api: Api, t, **kw) -> dict:
    sid = (await api.client.post("/v1/loops/sessions", headers=t.headers, json={})).json()["session"]["id"]
    r = await api.client.post(
        "/v1/loops/trainers", headers=t.headers, json={"session_id": sid, "base_model": TEST_MODEL, **kw}
    )
    assert r.status_code == 200, r.text
    return r.json()["run"]


def run_headers(t, run: dict, **extra: str) -> dict[str, str]:
    return {**t.headers, "X-Run-Id": run["id"], **ACCEPT, **extra}


async def submit(api: Api, t, run: dict, op: str, body: dict, key: str) -> httpx.Response:
    return await api.client.post(
        f"{run['base_url']}/{op}",
        headers=run_headers(t, run, **{"Idempotency-Key": key}),
        json={"run_id": run["id"], **body},
    )


async def stream(api: Api, run_id: str) -> list[OpEnvelope]:
    return [OpEnvelope.from_fields(f) for _, f in await api.runtime.redis.xrange(q.ops_stream(run_id))]


def gateway(r: httpx.Response, code: str) -> None:
    """A refusal the SDK must not retry: the gateway's error headers and our JSON body."""
    assert r.headers["x-baseten-error-source"] == "06", r.headers
    assert r.headers["x-baseten-error-code"] == code == r.json()["code"], r.text


DATUM = {
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7, 8]}]},
    "loss_fn_inputs": {"target_tokens": {"data": [-100, 7, 8, 9], "dtype": "int64", "shape": [4]}},
}


async def test_addressing_and_error_headers(api: Api) -> None:
    t = await api.tenant("acme")
    run = await new_run(api, t, lora_rank=8)
    health = run["base_url"] + "/health"
    assert run["base_url"] == f"http://testserver/v1/loops/deployments/{run['deployment_id']}/trainer"
    # no worker runs it yet: not ready (the SDK polls on), never faked
    r = await api.client.get(health, params={"base_model": TEST_MODEL}, headers=run_headers(t, run))
    assert r.status_code == 503 and r.json()["status"] == "starting" and r.json()["run_id"] == run["id"]
    # a request must name its run: 400 run_or_sampler_required, marked as the gateway's
    r = await api.client.get(health, headers={**t.headers, **ACCEPT})
    assert r.status_code == 400
    gateway(r, "run_or_sampler_required")
    r = await api.client.get(health, headers={**run_headers(t, run), "X-Sampler-Id": "smp-x"})
    assert r.status_code == 400 and r.json()["code"] == "run_or_sampler_required"
    r = await api.client.get(health, headers=t.headers)  # without Accept-Error: the plain error body only
    assert r.status_code == 400 and "x-baseten-error-source" not in r.headers
    # a wrong model, a run of another deployment, another org: 404, marked
    r = await api.client.get(health, params={"base_model": "tiny/other-llm"}, headers=run_headers(t, run))
    assert r.status_code == 404
    gateway(r, "not_found")
    other_run = await new_run(api, t)
    r = await api.client.get(health, headers=run_headers(t, other_run))
    assert r.status_code == 404
    intruder = await api.tenant("intruder")
    r = await api.client.get(health, headers={**intruder.headers, "X-Run-Id": run["id"]})
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    # an ended run answers 410 (the SDK does not retry it)
    r = await submit(api, t, run, "optim_step", {"seq_id": 1, "adam_params": {}}, "k-before-end")
    assert r.status_code == 202, r.text
    await api.client.post(f"/v1/loops/runs/{run['id']}/deactivate", headers=t.headers)
    r = await api.client.get(health, headers=run_headers(t, run))
    assert r.status_code == 410
    gateway(r, "gone")
    r = await submit(api, t, run, "optim_step", {"seq_id": 2, "adam_params": {}}, "k-after-end")
    assert r.status_code == 410
    # ... but the retry of an op accepted before the end is that same operation, not a 410
    r = await submit(api, t, run, "optim_step", {"seq_id": 1, "adam_params": {}}, "k-before-end")
    assert r.status_code == 202 and r.json()["operation_id"] == "k-before-end", r.text
    r = await submit(api, t, run, "optim_step", {"seq_id": 1, "adam_params": {"lr": 1}}, "k-before-end")
    assert r.status_code == 409  # the same key with another body, even on an ended run


async def test_ops_keys_seq_ids_and_polls(api: Api) -> None:
    t = await api.tenant("acme")
    run = await new_run(api, t, lora_rank=8)
    r = await submit(
        api, t, run, "init_trainer_server", {"lora_rank": 8, "base_model": TEST_MODEL, "seq_id": 1}, "op-1"
    )
    assert r.status_code == 202, r.text
    assert r.json() == {"operation_id": "op-1", "schema_version": 1}
    assert r.headers["location"] == f"/v1/loops/deployments/{run['deployment_id']}/trainer/operations/op-1"
    # a retry with the same key is the same operation: nothing new is enqueued
    again = await submit(
        api, t, run, "init_trainer_server", {"lora_rank": 8, "base_model": TEST_MODEL, "seq_id": 1}, "op-1"
    )
    assert again.status_code == 202 and again.json()["operation_id"] == "op-1"
    fb = {
        "seq_id": 2,
        "data": [DATUM],
        "loss_fn": "cross_entropy",
        "loss_fn_config": {"skip_token_normalization": True},
        "top_k_logprobs": 3,
    }
    assert (await submit(api, t, run, "forward_backward", fb, "op-2")).status_code == 202
    ops = await stream(api, run["id"])
    assert [(e.seq_id, e.kind, e.dialect) for e in ops] == [
        (0, OpKind.CREATE, Dialect.TINKER),
        (1, OpKind.INIT_TRAINER, Dialect.LOOPS),
        (2, OpKind.FORWARD_BACKWARD, Dialect.LOOPS),
    ]
    assert json.loads(ops[1].body) == {"lora_rank": 8}
    req = pb.ForwardBackwardRequest.FromString(ops[2].body)
    assert req.loss_fn == "cross_entropy" and not req.forward_only
    assert (
        req.loss_fn_config_v2["top_k_logprobs"].number == 3
        and req.loss_fn_config_v2["skip_token_normalization"].number == 1
    )
    assert bytes(req.data[0].loss_fn_inputs["target_tokens"].dense) == b"".join(
        x.to_bytes(8, "little", signed=True) for x in (-100, 7, 8, 9)
    )
    # the same key with another body is a conflict; a key is required
    r = await submit(api, t, run, "init_trainer_server", {"lora_rank": 8, "seq_id": 9}, "op-1")
    assert r.status_code == 409
    gateway(r, "conflict")
    r = await api.client.post(f"{run['base_url']}/optim_step", headers=run_headers(t, run), json={"seq_id": 3})
    assert r.status_code == 400 and r.json()["field"] == "Idempotency-Key"

    # polls: 408 while pending (not marked: the SDK polls again), the result once done
    poll = f"{run['base_url']}/operations/op-2"
    r = await api.client.get(poll, headers=run_headers(t, run))
    assert r.status_code == 408 and "x-baseten-error-source" not in r.headers
    rid = await _request_id(api, run, "op-2")
    result = {"loss": 1.5, "loss_fn_output_type": "TensorData", "loss_fn_outputs": [], "metrics": {"loss": 1.5}}
    await TrainerQueue(api.runtime.redis).complete(run["id"], rid, FutureResult.ok_json(result))
    r = await api.client.get(poll, headers=run_headers(t, run))
    assert r.status_code == 200 and r.json() == {"status": "done", "result": result}
    init_rid = await _request_id(api, run, "op-1")
    await TrainerQueue(api.runtime.redis).complete(
        run["id"], init_rid, FutureResult.failed("boom", q.ErrorCategory.USER)
    )
    r = await api.client.get(f"{run['base_url']}/operations/op-1", headers=run_headers(t, run))
    assert r.json() == {"status": "error", "error": "boom", "error_class": "UserError"}
    r = await api.client.get(f"{run['base_url']}/operations/nope", headers=run_headers(t, run))
    assert r.status_code == 404  # the SDK's UnknownRequestError: unknown or expired
    intruder = await api.tenant("intruder")
    r = await api.client.get(poll, headers={**intruder.headers, "X-Run-Id": run["id"]})
    assert r.status_code == 404


async def test_a_refused_op_fills_its_seq_slot(api: Api) -> None:
    t = await api.tenant("acme")
    run = await new_run(api, t, lora_rank=8)
    cases = [
        ("save_state", {"seq_id": 1, "name": "../escape"}, "name"),
        ("optim_step", {"seq_id": 2, "adam_params": {"learning_rate": -1}}, "adam_params.learning_rate"),
        ("forward_backward", {"seq_id": 3, "data": []}, "data"),
        ("forward", {"seq_id": 4, "data": [{**DATUM, "loss_fn_inputs": {}}]}, "loss_fn_inputs"),
        ("forward", {"seq_id": 5, "data": [{**DATUM, "model_input": {"chunks": [{"type": "image"}]}}]}, "model_input"),
        ("load_state", {"seq_id": 6, "path": "s3://bucket/x"}, "path"),
        ("load_state_with_optimizer", {"seq_id": 7, "path": f"bt://loops:{run['id']}/weights/missing"}, "path"),
        ("init_trainer_server", {"seq_id": 8, "lora_rank": 16}, "lora_rank"),
        ("forward_backward", {"seq_id": 9, "data": [DATUM], "top_k_logprobs": 21}, "top_k_logprobs"),
    ]
    for i, (op, body, field) in enumerate(cases, start=1):
        r = await submit(api, t, run, op, body, f"bad-{i}")
        assert r.status_code == 400, (op, r.text)
        assert r.json()["field"] == field, (op, r.json())
        gateway(r, "invalid_input")
    ops = await stream(api, run["id"])
    # every refused op still took its slot (as a rejected op), so later ops are not held back
    assert [(e.seq_id, e.kind) for e in ops[1:]] == [(i, OpKind.REJECTED) for i in range(1, len(cases) + 1)]
    r = await api.client.get(f"{run['base_url']}/operations/bad-1", headers=run_headers(t, run))
    assert r.json()["status"] == "error" and r.json()["error_class"] == "UserError"
    # a body that is not JSON at all cannot say its seq: refused without a slot
    r = await api.client.post(
        f"{run['base_url']}/optim_step",
        content=b"{nope",
        headers={**run_headers(t, run), "Idempotency-Key": "junk", "content-type": "application/json"},
    )
    assert r.status_code == 400


async def test_a_second_client_on_a_run_starts_a_new_seq_epoch(api: Api) -> None:
    t = await api.tenant("acme")
    run = await new_run(api, t, lora_rank=8)
    for seq, key in ((1, "a1"), (2, "a2"), (3, "a3")):
        body = {"seq_id": seq, "lora_rank": 8} if seq == 1 else {"seq_id": seq, "adam_params": {}}
        op = "init_trainer_server" if seq == 1 else "optim_step"
        assert (await submit(api, t, run, op, body, key)).status_code == 202
    # a new TrainingClient on the same run starts at seq 1 again, with init_trainer_server
    assert (await submit(api, t, run, "init_trainer_server", {"seq_id": 1, "lora_rank": 8}, "b1")).status_code == 202
    assert (await submit(api, t, run, "optim_step", {"seq_id": 2, "adam_params": {}}, "b2")).status_code == 202
    assert [e.seq_id for e in await stream(api, run["id"])] == [0, 1, 2, 3, 4, 5]
    # the old client's next op lands on a slot the new client owns: a clear conflict
    r = await submit(api, t, run, "optim_step", {"seq_id": 2, "adam_params": {}}, "a4")
    assert r.status_code == 409 and "only one training client" in r.json()["detail"]


async def test_policy_version_is_the_workers_optimizer_steps(api: Api) -> None:
    t = await api.tenant("acme")
    run = await new_run(api, t)
    url = f"{run['base_url']}/policy_version"
    assert (await api.client.get(url, headers=run_headers(t, run))).json()["policy_version"] == 0
    await api.runtime.redis.hset(q.run_state_key(run["id"]), mapping={"optim_steps": "7"})
    assert (await api.client.get(url, headers=run_headers(t, run))).json() == {"policy_version": 7, "run_id": run["id"]}


async def test_sampler_plane_routing_status_and_versions(api: Api) -> None:
    t = await api.tenant("acme")
    run = await new_run(api, t, lora_rank=8)
    sid = (await api.client.get(f"/v1/loops/sessions/{run['session_id']}", headers=t.headers)).json()["session"]["id"]
    r = await api.client.post("/v1/loops/samplers", headers=t.headers, json={"session_id": sid, "run_id": run["id"]})
    smp = r.json()["sampler"]
    assert (smp["model_id"], smp["deployment_id"]) == (smp["id"], smp["id"])
    again = await api.client.post(
        "/v1/loops/samplers", headers=t.headers, json={"session_id": sid, "run_id": run["id"]}
    )
    assert again.json()["sampler"]["id"] == smp["id"]  # idempotent per run
    base = smp["base_url"]
    assert base == f"http://testserver/v1/loops/samplers/{smp['id']}/sync"
    # the status route the SDK polls
    st = await api.client.get(f"/v1/models/{smp['id']}/deployments/{smp['id']}", headers=t.headers)
    assert st.status_code == 200 and st.json()["status"] == "DEPLOYING"
    assert (await api.client.get(f"/v1/models/{smp['id']}/deployments/other", headers=t.headers)).status_code == 404
    intruder = await api.tenant("intruder")
    assert (
        await api.client.get(f"/v1/models/{smp['id']}/deployments/{smp['id']}", headers=intruder.headers)
    ).status_code == 404
    # routing headers: exactly one of run / sampler, or a checkpoint path
    body = {"prompt": [1, 2, 3], "max_tokens": 2}
    r = await api.client.post(f"{base}/sample", json=body, headers={**t.headers, **ACCEPT})
    assert r.status_code == 400
    gateway(r, "run_or_sampler_required")
    r = await api.client.post(f"{base}/sample", json=body, headers={**t.headers, "X-Run-Id": "run-other", **ACCEPT})
    assert r.status_code == 404
    r = await api.client.post(
        f"{base}/sample", json={"prompt": "text"}, headers={**t.headers, "X-Run-Id": run["id"], **ACCEPT}
    )
    assert r.status_code == 400 and r.json()["field"] == "prompt"
    # not serving yet: 503, which the SDK retries
    r = await api.client.post(f"{base}/sample", json=body, headers={**t.headers, "X-Run-Id": run["id"], **ACCEPT})
    assert r.status_code == 503 and "x-baseten-error-source" not in r.headers
    # versions: the run publishes an adapter (save_weights_for_sampler with bump_version)
    tpv = f"{base}/trainers_policy_version"
    assert (await api.client.get(tpv, headers=t.headers)).json()["policy_version"] == 0
    ck = await add_checkpoint(api.runtime, t, run["id"], "default")
    async with api.runtime.db.transaction() as s:
        await s.execute(update(Run).where(Run.id == run["id"]).values(published_checkpoint_id=ck.id, policy_version=3))
    assert (await api.client.get(tpv, headers=t.headers)).json()["policy_version"] == 3
    # what serves under X-Min-Policy-Version (and X-Checkpoint-Path)
    plane = LoopsSamplerPlane(api.runtime)
    target = await plane.target(t.principal, smp["id"], Routing(run["id"], None, None, None))
    live = await plane.serving(t.principal, target, Routing(run["id"], None, None, 3))
    assert (live.version, live.label) == (3, "default") and live.model != TEST_MODEL
    with pytest.raises(PolicyVersionBehind):
        await plane.serving(t.principal, target, Routing(run["id"], None, None, 4), wait_s=0.3)
    pinned_ck = await add_checkpoint(api.runtime, t, run["id"], "older")
    pinned = await plane.serving(
        t.principal, target, Routing(run["id"], None, f"bt://loops:{run['id']}/sampler_weights/older", 4)
    )
    assert pinned.label == "older" and pinned.model != live.model and pinned_ck.id
    models = plane.models_json(live)
    assert [(m["id"], m["parent"]) for m in models["data"]] == [(TEST_MODEL, None), ("default", TEST_MODEL)]
    # wake: a sampler that is not scaled to zero stays as it is
    r = await api.client.post(f"/v1/loops/samplers/{smp['id']}/wake", headers=t.headers)
    assert r.status_code == 202 and r.json()["status"] == "DEPLOYING"


async def _request_id(api: Api, run: dict, operation_id: str) -> str:
    from control_plane.training.loops_queue import LoopsQueue

    rid = await LoopsQueue(api.runtime.redis).request_id(run["id"], operation_id)
    assert rid is not None
    return rid
