"""The Tinker API's validation, sessions and REST listing through the real app (real Postgres and
Redis, no worker): what must be answered before anything reaches a trainer."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import zstandard
from sqlalchemy import select, update

from control_plane.db.models import Run, Session
from control_plane.scaling.activity import activity_key
from control_plane.scaling.kinds import RUN
from control_plane.services.heartbeats import expire_sessions, flush_session_heartbeats
from control_plane.training.queue import TrainerQueue
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.queue import FutureState, ops_stream, run_pending_key
from tests.control_plane.conftest import TEST_MODEL, Api
from tests.control_plane.seed import add_checkpoint


async def _session(api: Api, headers: dict[str, str]) -> str:
    res = await api.client.post(
        "/api/v1/create_session",
        json={"tags": ["t"], "user_metadata": {"a": 1}, "sdk_version": "0.38.0", "type": "create_session"},
        headers=headers,
    )
    assert res.status_code == 200, res.text
    return res.json()["session_id"]


async def _model(api: Api, headers: dict[str, str]) -> str:
    """A new session's first training model (its create op waits: no worker here)."""
    sid = await _session(api, headers)
    res = await api.client.post(
        "/api/v1/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": TEST_MODEL}, headers=headers
    )
    assert res.status_code == 200, res.text
    return str(res.json()["model_id"])


def _fwd(model_id: str, seq_id: int, tokens: list[int]) -> bytes:
    req = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    d = req.data.add()
    d.model_input.add().encoded_text.tokens = b"".join(t.to_bytes(4, "little") for t in tokens)
    return req.SerializeToString()


async def test_bootstrap_routes(api: Api) -> None:
    t = await api.tenant("acme")
    cfg = await api.client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}, headers=t.headers)
    assert cfg.status_code == 200 and cfg.json()["proto_compress_fwdbwd"] is True
    assert cfg.json()["proto_write_fwdbwd"] is True and cfg.json()["fwd_via_fwdbwd"] is True  # SDKs 0.20-0.24
    dyn = await api.client.post("/api/v1/client/dynamic_config", json={"sdk_version": "0.38.0"}, headers=t.headers)
    assert dyn.json()["refresh_interval_sec"] == 300
    tel = await api.client.post("/api/v1/telemetry", json={"events": [], "session_id": "x"}, headers=t.headers)
    assert tel.json() == {"status": "accepted"}
    bad_tel = await api.client.post("/api/v1/telemetry", json={"events": "nope"}, headers=t.headers)
    assert bad_tel.status_code == 400 and bad_tel.json()["field"] == "events"
    caps = await api.client.get("/api/v1/get_server_capabilities", headers=t.headers)
    assert TEST_MODEL in [m["model_name"] for m in caps.json()["supported_models"]]
    assert (await api.client.post("/api/v1/client/config", json={})).status_code == 401


async def test_create_model_validation_and_rows(api: Api) -> None:
    t = await api.tenant("acme")
    sid = await _session(api, t.headers)
    body = {"session_id": sid, "model_seq_id": 0, "base_model": TEST_MODEL, "lora_config": {"rank": 8}}
    cases = [
        ({**body, "base_model": "nope/nope"}, "base_model"),
        ({**body, "lora_config": {"rank": 0}}, "lora_config.rank"),
        (
            {**body, "lora_config": {"rank": 8, "train_attn": False, "train_mlp": False, "train_unembed": False}},
            "lora_config",
        ),
        ({**body, "optimizer_config": {"type": "dimuon", "version": 1}}, "optimizer_config"),
        ({**body, "model_seq_id": -1}, "model_seq_id"),
        ({**body, "session_id": "no-such-session"}, None),
    ]
    for bad, field in cases:
        res = await api.client.post("/api/v1/create_model", json=bad, headers=t.headers)
        assert res.status_code in (400, 404), (bad, res.text)
        if field:
            assert res.json().get("field") == field, res.text
    # nothing half-written: no run rows from the rejected requests
    async with api.runtime.db.session() as s:
        assert (await s.execute(select(Run))).scalars().first() is None
    ok = await api.client.post("/api/v1/create_model", json=body, headers=t.headers)
    assert ok.status_code == 200
    fut = ok.json()
    assert fut["model_id"] == f"{sid}:train:0" and fut["request_id"].startswith("req-")
    async with api.runtime.db.session() as s:
        run = await s.get(Run, fut["model_id"])
    assert (run.origin, run.session_id, run.lora_rank, run.status) == ("tinker", sid, 8, "DEPLOYING")
    assert await api.runtime.redis.xlen(ops_stream(run.id)) == 1
    # the op counts as activity of the run (flushed into last_request_at by the controller)
    assert await api.runtime.redis.hget(activity_key(RUN), run.id) is not None
    info = await api.client.post("/api/v1/get_info", json={"model_id": run.id}, headers=t.headers)
    assert info.json()["model_data"]["model_name"] == TEST_MODEL and info.json()["lora_rank"] == 8


async def test_training_op_validation(api: Api) -> None:
    t = await api.tenant("acme")
    mid = await _model(api, t.headers)
    h = {**t.headers, "Content-Type": "application/x-protobuf"}
    garbage = await api.client.post("/api/v1/forward_backward", content=b"\xff\xff\xff", headers=h)
    assert garbage.status_code == 400 and "ForwardBackwardRequest" in garbage.json()["detail"]
    seq0 = await api.client.post("/api/v1/forward_backward", content=_fwd(mid, 0, [1, 2, 3]), headers=h)
    assert seq0.status_code == 400 and seq0.json()["field"] == "seq_id"
    unknown = await api.client.post("/api/v1/forward_backward", content=_fwd("nope:train:0", 1, [1, 2]), headers=h)
    assert unknown.status_code == 404
    bad_zstd = await api.client.post(
        "/api/v1/forward_backward", content=b"not zstd", headers={**h, "Content-Encoding": "zstd"}
    )
    assert bad_zstd.status_code == 400 and "zstd" in bad_zstd.json()["detail"]
    packed = zstandard.ZstdCompressor().compress(_fwd(mid, 1, [1, 2, 3]))
    ok = await api.client.post("/api/v1/forward_backward", content=packed, headers={**h, "Content-Encoding": "zstd"})
    assert ok.status_code == 200 and ok.json()["model_id"] == mid
    again = await api.client.post("/api/v1/forward_backward", content=_fwd(mid, 1, [9, 9]), headers=h)
    assert again.json()["request_id"] == ok.json()["request_id"]  # the same (model_id, seq_id)
    # each rejected op (model and seq known) still fills its seq slot, or later ops would wait
    seq = iter(range(2, 100))

    async def expect_400(route: str, body: dict, field: str) -> None:
        res = await api.client.post(f"/api/v1/{route}", json=body, headers=t.headers)
        assert res.status_code == 400 and res.json().get("field") == field, (route, body, res.text)

    for adam, field in (
        ({"learning_rate": "x"}, "adam_params.learning_rate"),
        ({"eps": 0}, "adam_params.eps"),
        ({"grad_clip_norm": -1}, "adam_params.grad_clip_norm"),
    ):
        await expect_400("optim_step", {"model_id": mid, "seq_id": next(seq), "adam_params": adam}, field)
    await expect_400(
        "optim_step", {"model_id": mid, "seq_id": next(seq), "optimizer_params": {"type": "dimuon"}}, "optimizer_params"
    )
    for body, field in (({"path": "a/b"}, "path"), ({}, "path"), ({"path": "ok", "ttl_seconds": 0}, "ttl_seconds")):
        await expect_400("save_weights", {"model_id": mid, "seq_id": next(seq), **body}, field)
    await expect_400("save_weights_for_sampler", {"model_id": mid, "seq_id": next(seq)}, "sampling_session_seq_id")
    for path in ("s3://x/y", f"tinker://{mid}/weights/missing"):
        await expect_400(
            "load_weights", {"model_id": mid, "seq_id": next(seq), "path": path, "optimizer": True}, "path"
        )
    last = next(seq) - 1
    # refused before the seq_id is known: nothing is enqueued
    await expect_400("save_weights", {"model_id": mid, "path": "ok"}, "seq_id")
    inflight = await api.client.post(
        "/api/v1/save_weights_for_sampler", json={"model_id": mid, "seq_id": 99, "kind": "inflight"}, headers=t.headers
    )
    assert inflight.status_code == 400 and inflight.json()["field"] == "kind"
    # seq 0 (create), seq 1 (forward_backward) and one "rejected" filler per refused op
    assert await api.runtime.redis.xlen(ops_stream(mid)) == 2 + (last - 1)
    # a retry of a refused op gets its future, failed with the same message (category user)
    retry = await api.client.post(
        "/api/v1/optim_step", json={"model_id": mid, "seq_id": 3, "adam_params": {"eps": 0}}, headers=t.headers
    )
    assert retry.status_code == 200
    failed = await api.client.post(
        "/api/v1/retrieve_future", json={"request_id": retry.json()["request_id"]}, headers=t.headers
    )
    assert failed.json()["category"] == "user" and "eps" in failed.json()["error"]
    # another org cannot touch the model
    other = await api.tenant("other-org")
    res = await api.client.post("/api/v1/optim_step", json={"model_id": mid, "seq_id": 2}, headers=other.headers)
    assert res.status_code == 404


async def test_heartbeats_expiry_and_finish(api: Api) -> None:
    t = await api.tenant("acme")
    sid = await _session(api, t.headers)
    hb = await api.client.post("/api/v1/session_heartbeat", json={"session_id": sid}, headers=t.headers)
    assert hb.status_code == 200
    old = datetime.now(UTC) - timedelta(hours=1)
    async with api.runtime.db.transaction() as s:
        await s.execute(update(Session).where(Session.id == sid).values(last_heartbeat_at=old))
    # the heartbeat recorded in Redis is flushed to Postgres, so the session is not idle
    assert await flush_session_heartbeats(api.runtime.db, api.runtime.redis) == 1
    assert await expire_sessions(api.runtime.db, timedelta(minutes=5)) == []
    async with api.runtime.db.transaction() as s:
        await s.execute(update(Session).where(Session.id == sid).values(last_heartbeat_at=old))
    assert await expire_sessions(api.runtime.db, timedelta(minutes=5)) == [sid]
    gone = await api.client.post("/api/v1/session_heartbeat", json={"session_id": sid}, headers=t.headers)
    assert gone.status_code == 410 and "expired" in gone.json()["detail"]
    create = await api.client.post(
        "/api/v1/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": TEST_MODEL}, headers=t.headers
    )
    assert create.status_code == 400 and create.json()["field"] == "session_id"

    sid2 = await _session(api, t.headers)
    await api.client.post(
        "/api/v1/create_model",
        json={"session_id": sid2, "model_seq_id": 0, "base_model": TEST_MODEL},
        headers=t.headers,
    )
    fin = await api.client.post(
        f"/api/v1/sessions/{sid2}/finish", json={"reason": {"type": "errored"}, "detail": "boom"}, headers=t.headers
    )
    assert fin.status_code == 200
    again = await api.client.post(
        f"/api/v1/sessions/{sid2}/finish", json={"reason": {"type": "success"}}, headers=t.headers
    )
    assert again.json()["reason"] == "errored"  # the first reason wins
    async with api.runtime.db.session() as s:
        run = await s.get(Run, f"{sid2}:train:0")
    assert run.status == "DEACTIVATING"
    bad = await api.client.post(f"/api/v1/sessions/{sid2}/finish", json={"reason": {"type": "meh"}}, headers=t.headers)
    assert bad.status_code == 400


async def test_rest_listing_pages_and_scopes(api: Api) -> None:
    t = await api.tenant("acme")
    mate = await api.tenant("acme", email="mate@example.com")
    sid = await _session(api, t.headers)
    for n in range(3):
        res = await api.client.post(
            "/api/v1/create_model",
            json={
                "session_id": sid,
                "model_seq_id": n,
                "base_model": TEST_MODEL,
                "user_metadata": {"renderer_name": "qwen3", "n": n},
            },
            headers=t.headers,
        )
        assert res.status_code == 200
    page = (await api.client.get("/api/v1/training_runs", params={"limit": 2, "offset": 0}, headers=t.headers)).json()
    assert page["cursor"] == {"offset": 0, "limit": 2, "total_count": 3}
    assert [r["training_run_id"] for r in page["training_runs"]] == [f"{sid}:train:2", f"{sid}:train:1"]
    rest = (await api.client.get("/api/v1/training_runs", params={"limit": 2, "offset": 2}, headers=t.headers)).json()
    assert [r["training_run_id"] for r in rest["training_runs"]] == [f"{sid}:train:0"]
    one = (await api.client.get(f"/api/v1/training_runs/{sid}:train:0", headers=t.headers)).json()
    assert one["user_metadata"] == {"renderer_name": "qwen3", "n": "0"} and one["last_checkpoint"] is None
    # a teammate sees them only with access_scope=accessible
    own = (await api.client.get("/api/v1/training_runs", headers=mate.headers)).json()
    assert own["cursor"]["total_count"] == 0
    org = (
        await api.client.get("/api/v1/training_runs", params={"access_scope": "accessible"}, headers=mate.headers)
    ).json()
    assert org["cursor"]["total_count"] == 3
    async with api.runtime.db.session() as s:
        project = (await s.get(Session, sid)).training_project_id
    in_project = (
        await api.client.get("/api/v1/training_runs", params={"project_id": project}, headers=t.headers)
    ).json()
    assert in_project["cursor"]["total_count"] == 3
    elsewhere = (
        await api.client.get("/api/v1/training_runs", params={"project_id": "proj-none"}, headers=t.headers)
    ).json()
    assert elsewhere["cursor"]["total_count"] == 0
    bad = await api.client.get("/api/v1/training_runs", params={"limit": 0}, headers=t.headers)
    assert bad.status_code == 400 and bad.json()["field"] == "limit"
    bad_scope = await api.client.get("/api/v1/training_runs", params={"access_scope": "all"}, headers=t.headers)
    assert bad_scope.status_code == 400
    sess = (await api.client.get(f"/api/v1/sessions/{sid}", headers=t.headers)).json()
    assert len(sess["training_run_ids"]) == 3 and sess["user_metadata"] == {"a": 1}
    assert sid in (await api.client.get("/api/v1/sessions", headers=t.headers)).json()["sessions"]
    missing = await api.client.delete(
        f"/api/v1/training_runs/{sid}:train:0/checkpoints/weights/nope", headers=t.headers
    )
    assert missing.status_code == 404
    bad_id = await api.client.delete(f"/api/v1/training_runs/{sid}:train:0/checkpoints/other/x", headers=t.headers)
    assert bad_id.status_code == 400
    wi = await api.client.post("/api/v1/weights_info", json={"tinker_path": "tinker://bad"}, headers=t.headers)
    assert wi.status_code == 400 and wi.json()["field"] == "tinker_path"


async def test_an_op_on_a_run_that_ended_fails_from_the_mark_and_later_from_the_row(api: Api) -> None:
    """The ops route reads its run through the process's read cache and no longer reads the
    database after submitting: ending a run marks it in Redis before the pending sweep
    (TrainerQueue.end_run), so an op that slipped in past a still-cached ACTIVE row fails at
    once with the run's reason, one pending at the sweep fails with it, and once the row's
    change reaches the cache the route answers 410 without enqueuing anything."""
    t = await api.tenant("acme")
    mid = await _model(api, t.headers)
    h = {**t.headers, "Content-Type": "application/x-protobuf"}
    queue = TrainerQueue(api.runtime.redis)

    async def submit(seq: int) -> str:
        res = await api.client.post("/api/v1/forward_backward", content=_fwd(mid, seq, [1, 2, 3]), headers=h)
        assert res.status_code == 200, res.text
        return str(res.json()["request_id"])

    pending = await submit(1)
    first = await queue.read(pending)
    assert first is not None and first.state == FutureState.PENDING
    # the controller's side, the row left as it is: a cached or stale ACTIVE row lets ops in
    assert await queue.end_run(mid, f"run {mid} is INACTIVE: deactivated") == 2  # the create too (no worker)
    swept = await queue.read(pending)
    assert swept is not None and swept.state == FutureState.FAILED and b"deactivated" in swept.body
    late = await submit(2)
    late_future = await queue.read(late)
    assert late_future is not None and late_future.state == FutureState.FAILED
    assert b"INACTIVE: deactivated" in late_future.body
    assert await api.runtime.redis.scard(run_pending_key(mid)) == 0  # nothing left waiting
    # the row changes: the read cache drops the run, the next op is refused before any queueing
    async with api.runtime.db.transaction() as s:
        await s.execute(update(Run).where(Run.id == mid).values(status="INACTIVE", status_reason="deactivated"))
    before = await api.runtime.redis.xlen(ops_stream(mid))
    res = await api.client.post("/api/v1/forward_backward", content=_fwd(mid, 3, [1, 2, 3]), headers=h)
    assert res.status_code == 410 and "INACTIVE" in res.json()["detail"]
    assert await api.runtime.redis.xlen(ops_stream(mid)) == before
    # ... but an HTTP retry of an op submitted before the end is that op's future, not a 410
    res = await api.client.post("/api/v1/forward_backward", content=_fwd(mid, 2, [1, 2, 3]), headers=h)
    assert res.status_code == 200 and res.json()["request_id"] == late, res.text


CKPT_KEY = "openloops.activation_checkpointing"


async def _seq0_body(api: Api, model_id: str) -> dict:
    entries = await api.runtime.redis.xrange(ops_stream(model_id))
    assert entries and entries[0][1][b"seq_id"] == b"0"
    return json.loads(entries[0][1][b"body"])


async def test_activation_checkpointing_in_user_metadata(api: Api) -> None:
    """user_metadata["openloops.activation_checkpointing"]: a bad value is a 400 naming the key
    and the modes before anything exists; a good one is stored on the run and rides in seq 0
    (create and create-via-load); no key leaves the choice to the server."""
    t = await api.tenant("acme")
    sid = await _session(api, t.headers)
    create = {"session_id": sid, "base_model": TEST_MODEL, "lora_config": {"rank": 8}}
    for seq, bad in enumerate(["sometimes", "ON", "", 1, None, ["on"]]):
        res = await api.client.post(
            "/api/v1/create_model",
            json={**create, "model_seq_id": seq, "user_metadata": {CKPT_KEY: bad, "x": "y"}},
            headers=t.headers,
        )
        assert res.status_code == 400, (bad, res.text)
        assert res.json()["field"] == f'user_metadata["{CKPT_KEY}"]', res.json()
        assert "auto, on, off" in res.json()["detail"], res.json()
    res = await api.client.post(
        "/api/v1/load_weights",
        json={
            "session_id": sid,
            "model_seq_id": 9,
            "path": "tinker://nope/weights/w",
            "optimizer": False,
            "user_metadata": {CKPT_KEY: "always"},
        },
        headers=t.headers,
    )
    assert res.status_code == 400 and res.json()["field"] == f'user_metadata["{CKPT_KEY}"]', res.text
    async with api.runtime.db.session() as s:
        assert (await s.execute(select(Run))).scalars().first() is None  # nothing created
    assert not await api.runtime.redis.keys(ops_stream("*"))

    ok = await api.client.post(
        "/api/v1/create_model",
        json={**create, "model_seq_id": 20, "user_metadata": {CKPT_KEY: "on", "team": "a"}},
        headers=t.headers,
    )
    assert ok.status_code == 200, ok.text
    on_id = ok.json()["model_id"]
    default = await api.client.post("/api/v1/create_model", json={**create, "model_seq_id": 21}, headers=t.headers)
    default_id = default.json()["model_id"]
    await add_checkpoint(api.runtime, t, on_id, "w1", kind="weights")
    loaded = await api.client.post(
        "/api/v1/load_weights",
        json={
            "session_id": sid,
            "model_seq_id": 22,
            "path": f"tinker://{on_id}/weights/w1",
            "optimizer": True,
            "user_metadata": {CKPT_KEY: "off"},
        },
        headers=t.headers,
    )
    assert loaded.status_code == 200, loaded.text
    off_id = loaded.json()["model_id"]
    async with api.runtime.db.session() as s:
        rows = {r.id: r for r in (await s.execute(select(Run))).scalars()}
    assert rows[on_id].activation_checkpointing == "on"
    assert rows[on_id].user_metadata == {CKPT_KEY: "on", "team": "a"}  # the metadata stays as sent
    assert rows[off_id].activation_checkpointing == "off" and rows[default_id].activation_checkpointing is None
    assert (await _seq0_body(api, on_id))["activation_checkpointing"] == "on"
    assert (await _seq0_body(api, default_id))["activation_checkpointing"] is None
    body = await _seq0_body(api, off_id)
    assert body["activation_checkpointing"] == "off" and body["tinker_path"] == f"tinker://{on_id}/weights/w1"
    # the Tinker listing shows the choice where the SDK put it: the run's user_metadata
    got = await api.client.get(f"/api/v1/training_runs/{on_id}", headers=t.headers)
    assert got.status_code == 200 and got.json()["user_metadata"][CKPT_KEY] == "on", got.text
