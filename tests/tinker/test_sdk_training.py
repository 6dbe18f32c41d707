"""The unmodified tinker SDK trains a LoRA through a live openloops server (real trainer
worker subprocess, real Postgres/Redis, local object store)."""

from __future__ import annotations

import math
import time

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.infra.live_server import LiveServer

pytestmark = pytest.mark.timeout(900)


def _datums(tok, texts: list[str]) -> list[types.Datum]:
    out = []
    for text in texts:
        ids = tok.encode(text)
        inp, tgt = ids[:-1], ids[1:]
        weights = [0.0] + [1.0] * (len(tgt) - 1)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(inp),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(data=tgt, dtype="int64", shape=[len(tgt)]),
                    "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
                },
            )
        )
    return out


TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "openloops trains tiny models on small machines",
    "a b c d e f g h i j k l m n o p",
]


def _loss(out: types.ForwardBackwardOutput) -> float:
    return float(out.metrics["loss:sum"])


@pytest.fixture(scope="module")
def service(live_server: LiveServer):
    client = tinker.ServiceClient(base_url=live_server.base_url, api_key=live_server.api_key)
    yield client
    client.close("interrupted").result()  # a no-op when the last test already closed it


def _run_row(live_server: LiveServer, run_id: str):
    from control_plane.db.models import Run

    async def _get():
        async with live_server.runtime.db.session() as s:
            return await s.get(Run, run_id)

    return live_server.call(_get())


def test_capabilities_list_the_catalog(service, live_server: LiveServer) -> None:
    rest = tinker.RestClient(base_url=live_server.base_url, api_key=live_server.api_key)
    caps = rest.get_server_capabilities().result()
    names = [m.model_name for m in caps.supported_models]
    assert live_server.model.name in names


def test_train_save_resume(service, live_server: LiveServer) -> None:
    tc = service.create_lora_training_client(
        live_server.model.name, rank=8, seed=0, user_metadata={"renderer_name": "role_colon"}
    ).result()
    model_id = tc.model_id
    assert model_id.endswith(":train:0") or ":train:" in model_id
    info = tc.get_info()
    assert info.model_data.model_name == live_server.model.name
    tok = tc.get_tokenizer()
    data = _datums(tok, TEXTS)

    # the run is a row visible through the Loops-facing model, ACTIVE once its worker is up
    row = _run_row(live_server, model_id)
    assert row is not None and row.origin == "tinker" and row.user_metadata == {"renderer_name": "role_colon"}

    losses = []
    adam = types.AdamParams(learning_rate=2e-2)
    for _ in range(4):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam)  # pipelined: submitted before the forward_backward result
        out = fb.result()
        losses.append(_loss(out))
        assert len(out.loss_fn_outputs) == len(data)
        lp = out.loss_fn_outputs[0]["logprobs"].to_numpy()
        assert lp.shape == (len(tok.encode(TEXTS[0])) - 1,)
        assert np.all(lp <= 0)
        metrics = opt.result().metrics or {}
        assert all(":" in k for k in metrics)
    assert losses[-1] < losses[0] * 0.9, losses

    # save the full state, then the same step from the live model and from a restored one
    state = tc.save_state("state-1").result()
    assert state.path == f"tinker://{model_id}/weights/state-1"
    sampler_ckpt = tc.save_weights_for_sampler("adapter-1").result()
    assert sampler_ckpt.path == f"tinker://{model_id}/sampler_weights/adapter-1"

    restored = service.create_training_client_from_state_with_optimizer(state.path).result()
    assert restored.model_id != model_id and ":train:" in restored.model_id
    a = tc.forward(data, "cross_entropy").result()
    b = restored.forward(data, "cross_entropy").result()
    assert math.isclose(_loss(a), _loss(b), rel_tol=1e-5, abs_tol=1e-5)
    for client in (tc, restored):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()
    a2 = tc.forward(data, "cross_entropy").result()
    b2 = restored.forward(data, "cross_entropy").result()
    assert _loss(a2) != pytest.approx(_loss(a), rel=1e-6)  # the step changed the weights
    assert math.isclose(_loss(a2), _loss(b2), rel_tol=1e-4, abs_tol=1e-4)

    # legacy load_state on a live model goes back to the saved weights
    tc.load_state(state.path).result()
    c = tc.forward(data, "cross_entropy").result()
    assert math.isclose(_loss(c), _loss(a), rel_tol=1e-5, abs_tol=1e-5)

    # REST: runs and checkpoints through both APIs
    rest = tinker.RestClient(base_url=live_server.base_url, api_key=live_server.api_key)
    run = rest.get_training_run(model_id).result()
    assert run.base_model == live_server.model.name
    assert run.user_metadata == {"renderer_name": "role_colon"}
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == state.path
    ckpts = rest.list_checkpoints(model_id).result().checkpoints
    assert {c.checkpoint_id for c in ckpts} == {"weights/state-1", "sampler_weights/adapter-1"}
    info = rest.get_weights_info_by_tinker_path(state.path).result()
    assert info.base_model == live_server.model.name and info.lora_rank == 8
    runs = {r.training_run_id: r for r in rest.list_training_runs(limit=100).result().training_runs}
    listed = runs[model_id]
    assert listed.last_checkpoint is not None and listed.last_checkpoint.tinker_path == state.path
    assert listed.last_sampler_checkpoint is not None
    assert listed.last_sampler_checkpoint.tinker_path == sampler_ckpt.path
    loops = httpx.get(
        f"{live_server.base_url}/v1/loops/checkpoints",
        params={"run_id": model_id},
        headers={"Authorization": f"Bearer {live_server.api_key}"},
    ).json()
    assert {c["tinker_path"] for c in loops["checkpoints"]} == {state.path, sampler_ckpt.path}

    rest.delete_checkpoint(model_id, "sampler_weights/adapter-1").result()
    left = rest.list_checkpoints(model_id).result().checkpoints
    assert [c.checkpoint_id for c in left] == ["weights/state-1"]


def test_user_errors_are_reported(service, live_server: LiveServer) -> None:
    with pytest.raises(Exception, match="unsupported base model"):
        service.create_lora_training_client("no/such-model", rank=8).result()
    tc = service.create_lora_training_client(live_server.model.name, rank=4, seed=1).result()
    tok = tc.get_tokenizer()
    data = _datums(tok, TEXTS[:1])
    with pytest.raises(tinker.RequestFailedError) as err:
        tc.forward_backward(data, "no_such_loss").result()
    assert "no_such_loss" in str(err.value)
    # the model keeps working after a rejected op
    assert _loss(tc.forward_backward(data, "cross_entropy").result()) > 0
    with pytest.raises(Exception, match="learning_rate"):
        tc.optim_step(types.AdamParams(learning_rate=-1.0)).result()
    far = types.Datum(
        model_input=types.ModelInput.from_ints([1, 10**6]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[2, 3], dtype="int64", shape=[2]),
            "weights": types.TensorData(data=[1.0, 1.0], dtype="float32", shape=[2]),
        },
    )
    with pytest.raises(tinker.RequestFailedError, match="vocab|token"):
        tc.forward_backward([far], "cross_entropy").result()
    # refused ops filled their seq slots: the model still trains
    assert _loss(tc.forward_backward(data, "cross_entropy").result()) > 0
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def test_activation_checkpointing_rides_in_user_metadata(service, live_server: LiveServer) -> None:
    """The unmodified SDK chooses a run's activation checkpointing through ``user_metadata``:
    a bad value is refused at create naming the key, a good one is the run's and it trains."""
    key = "openloops.activation_checkpointing"
    with pytest.raises(Exception, match=r"openloops\.activation_checkpointing.*auto, on, off"):
        service.create_lora_training_client(live_server.model.name, rank=4, user_metadata={key: "always"}).result()
    tc = service.create_lora_training_client(live_server.model.name, rank=4, seed=1, user_metadata={key: "on"}).result()
    assert _run_row(live_server, tc.model_id).activation_checkpointing == "on"
    assert _loss(tc.forward_backward(_datums(tc.get_tokenizer(), TEXTS[:1]), "cross_entropy").result()) > 0


def test_importance_sampling_matches_hand_computation(service, live_server: LiveServer) -> None:
    """With the sampler's logprobs equal to the learner's, every ratio is 1 and the summed
    importance-sampling loss is -sum(advantages)."""
    tc = service.create_lora_training_client(live_server.model.name, rank=4, seed=3).result()
    tok = tc.get_tokenizer()
    plain = _datums(tok, TEXTS)
    fwd = tc.forward(plain, "cross_entropy").result()
    rl, adv_total = [], 0.0
    for i, (d, out) in enumerate(zip(plain, fwd.loss_fn_outputs, strict=True)):
        lp = out["logprobs"].to_numpy().astype(np.float32)
        adv = np.full(lp.shape, 0.5 * (i + 1), dtype=np.float32)
        adv_total += float(adv.sum())
        rl.append(
            types.Datum(
                model_input=d.model_input,
                loss_fn_inputs={
                    "target_tokens": d.loss_fn_inputs["target_tokens"],
                    "logprobs": types.TensorData(data=lp.tolist(), dtype="float32", shape=list(lp.shape)),
                    "advantages": types.TensorData(data=adv.tolist(), dtype="float32", shape=list(adv.shape)),
                },
            )
        )
    out = tc.forward_backward(rl, "importance_sampling").result()
    assert _loss(out) == pytest.approx(-adv_total, rel=1e-4)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = tc.forward(plain, "cross_entropy").result()
    assert _loss(after) != pytest.approx(_loss(fwd), rel=1e-6)  # positive advantages moved the weights


def _post(live_server: LiveServer, path: str, body: dict, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{live_server.base_url}/api/v1/{path}",
        json=body,
        headers={"X-API-Key": key or live_server.api_key},
        timeout=60,
    )


def test_futures_idempotency_and_isolation(service, live_server: LiveServer) -> None:
    sess = _post(live_server, "create_session", {"tags": [], "user_metadata": {}, "type": "create_session"}).json()
    sid = sess["session_id"]
    create = {
        "session_id": sid,
        "model_seq_id": 0,
        "base_model": live_server.model.name,
        "lora_config": {"rank": 4, "seed": 0},
    }
    f0 = _post(live_server, "create_model", create).json()
    assert f0["model_id"] == f"{sid}:train:0"
    # a repeated (model_id, seq_id) gets the same future
    assert _post(live_server, "create_model", create).json()["request_id"] == f0["request_id"]
    # seq 2 (optim_step) arrives before seq 1 (a save): both run, in order
    opt = {"model_id": f0["model_id"], "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}
    f2 = _post(live_server, "optim_step", opt).json()
    assert _post(live_server, "optim_step", opt).json()["request_id"] == f2["request_id"]
    f1 = _post(live_server, "save_weights", {"model_id": f0["model_id"], "seq_id": 1, "path": "before"}).json()
    results = {}
    for name, fut in (("create", f0), ("save", f1), ("optim", f2)):
        deadline = time.monotonic() + 120
        while True:
            res = _post(live_server, "retrieve_future", {"request_id": fut["request_id"], "allow_metadata_only": True})
            assert res.status_code == 200, res.text
            body = res.json()
            if body.get("type") != "try_again":
                break
            assert time.monotonic() < deadline
        results[name] = body
    assert results["create"]["model_id"] == f0["model_id"]
    assert results["save"]["path"] == f"tinker://{f0['model_id']}/weights/before"
    assert "metrics" in results["optim"]
    # executed ops leave the run's stream (forward_backward bodies are large) once a snapshot
    # covers them (within the live server's 2 s snapshot interval)
    from data_plane.wire.queue import ops_stream

    deadline = time.monotonic() + 30
    while live_server.call(live_server.runtime.redis.xlen(ops_stream(f0["model_id"]))) != 0:
        assert time.monotonic() < deadline, "executed ops were never trimmed from the stream"
        time.sleep(0.1)
    # results can be fetched again
    again = _post(live_server, "retrieve_future", {"request_id": f1["request_id"]}).json()
    assert again == results["save"]
    # unknown futures are 410 with a JSON body
    gone = _post(live_server, "retrieve_future", {"request_id": "req-does-not-exist"})
    assert gone.status_code == 410 and "req-does-not-exist" in gone.json()["detail"]
    # an unnamed sampler save opens a sampling session pinned to that snapshot
    snap = _post(
        live_server, "save_weights_for_sampler", {"model_id": f0["model_id"], "seq_id": 3, "sampling_session_seq_id": 5}
    ).json()
    deadline = time.monotonic() + 120
    while (res := _post(live_server, "retrieve_future", {"request_id": snap["request_id"]}).json()).get(
        "type"
    ) == "try_again":
        assert time.monotonic() < deadline
    assert res["sampling_session_id"] == f"{sid}:sample:5"
    smp = live_server.call(_sampler_row(live_server, res["sampling_session_id"]))
    assert smp is not None and smp.checkpoint_id is not None and smp.base_model == live_server.model.name
    # a save over an existing name without overwrite is refused before it is queued
    dup = _post(live_server, "save_weights", {"model_id": f0["model_id"], "seq_id": 4, "path": "before"})
    assert dup.status_code == 400 and "already exists" in dup.json()["detail"] and dup.json()["field"] == "path"
    # bad input: a 400 naming the field
    bad = _post(live_server, "optim_step", {"model_id": f0["model_id"], "seq_id": 5, "adam_params": {"beta1": 1.5}})
    assert bad.status_code == 400 and "beta1" in bad.text

    # another org sees none of it
    other_key = live_server.call(_other_tenant_key(live_server))
    assert _post(live_server, "retrieve_future", {"request_id": f1["request_id"]}, key=other_key).status_code == 410
    assert _post(live_server, "get_info", {"model_id": f0["model_id"]}, key=other_key).status_code == 404
    assert _post(live_server, "optim_step", {**opt, "seq_id": 6}, key=other_key).status_code == 404

    # finishing the session: heartbeats answer 410 and the run is torn down
    fin = _post(live_server, f"sessions/{sid}/finish", {"reason": {"type": "success"}})
    assert fin.status_code == 200
    hb = _post(live_server, "session_heartbeat", {"session_id": sid})
    assert hb.status_code == 410
    deadline = time.monotonic() + 60
    while _run_row(live_server, f0["model_id"]).status != "INACTIVE":
        assert time.monotonic() < deadline, _run_row(live_server, f0["model_id"]).status
        time.sleep(0.5)


async def _sampler_row(live_server: LiveServer, sampler_id: str):
    from control_plane.db.models import Sampler

    async with live_server.runtime.db.session() as s:
        return await s.get(Sampler, sampler_id)


async def _other_tenant_key(live_server: LiveServer) -> str:
    from control_plane.services import identity

    async with live_server.runtime.db.transaction() as s:
        org = await identity.create_org(s, f"other-{time.time_ns()}")
        user = await identity.create_user(s, org, "x@example.com")
        key = await identity.create_api_key(s, user)
    return key.plaintext


def test_close_finishes_the_session(service, live_server: LiveServer) -> None:
    """Runs last in this module: ServiceClient.close() finishes the session (first reason wins)."""
    from control_plane.db.models import Run, Session

    tc = service.create_lora_training_client(live_server.model.name, rank=4, seed=2).result()
    service.close("success", detail="done").result()

    async def _rows():
        async with live_server.runtime.db.session() as s:
            run = await s.get(Run, tc.model_id)
            return await s.get(Session, run.session_id), run

    sess, run = live_server.call(_rows())
    assert (sess.status, sess.finish_reason, sess.finish_detail) == ("finished", "success", "done")
    assert run.status in ("DEACTIVATING", "INACTIVE")


def test_dpo_and_dppo_through_the_tinker_wire(live_server: LiveServer) -> None:
    """The Loops losses reach the Tinker API too (the protobuf takes any loss name): values match
    a hand computation from the model's own logprobs."""
    service = tinker.ServiceClient(base_url=live_server.base_url, api_key=live_server.api_key)
    try:
        _dpo_and_dppo(service, live_server)
    finally:
        service.close("success").result()


def _dpo_and_dppo(service: tinker.ServiceClient, live_server: LiveServer) -> None:
    tc = service.create_lora_training_client(live_server.model.name, rank=4, seed=6).result()
    tok = tc.get_tokenizer()
    plain = _datums(tok, TEXTS[:2])  # one (chosen, rejected) pair
    lps = [
        o["logprobs"].to_numpy().astype(np.float64) for o in tc.forward(plain, "cross_entropy").result().loss_fn_outputs
    ]
    weights = [d.loss_fn_inputs["weights"].to_numpy().astype(np.float64) for d in plain]
    ref = [lp - 0.01 * (i + 1) for i, lp in enumerate(lps)]  # a reference policy a little behind
    pairs = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": d.loss_fn_inputs["weights"],
                "ref_logprobs": types.TensorData(data=r.tolist(), dtype="float32", shape=list(r.shape)),
            },
        )
        for d, r in zip(plain, ref, strict=True)
    ]
    beta = 0.5
    out = tc.forward_backward(pairs, "dpo", {"beta": beta}).result()  # type: ignore[arg-type]
    s = [float((w * (lp - r)).sum()) for w, lp, r in zip(weights, lps, ref, strict=True)]
    margin = beta * (s[0] - s[1])
    assert _loss(out) == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-4)  # -log sigmoid(margin)
    assert out.metrics["dpo_margin:mean"] == pytest.approx(margin, rel=1e-3)
    assert out.metrics["dpo_accuracy:mean"] == (1.0 if margin > 0 else 0.0)
    with pytest.raises(tinker.RequestFailedError, match="pairs|even|odd"):
        tc.forward_backward(pairs[:1], "dpo").result()  # type: ignore[arg-type]

    # dppo with the behaviour policy equal to the learner: every ratio is 1, nothing is masked,
    # the KL term is 0, and the loss is -sum(advantages)
    rl = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "logprobs": types.TensorData(
                    data=lp.astype(np.float32).tolist(), dtype="float32", shape=list(lp.shape)
                ),
                "advantages": types.TensorData(data=[0.5] * len(lp), dtype="float32", shape=[len(lp)]),
            },
        )
        for d, lp in zip(plain, lps, strict=True)
    ]
    out = tc.forward_backward(rl, "dppo", {"adv_tau": 2.0}).result()  # type: ignore[arg-type]
    assert _loss(out) == pytest.approx(-sum(0.5 / 2.0 * len(lp) for lp in lps), rel=1e-4)
    assert out.metrics["dppo_masked_fraction:mean"] == 0.0
