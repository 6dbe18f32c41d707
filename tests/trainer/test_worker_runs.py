"""One trainer worker subprocess serving a deployment's runs one after another, driven only
through the Redis contract: attach events, Loops-dialect ops, the switch to the next run (its
waiting ops fail, its adapter starts fresh on the loaded base), and the restart check."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from data_plane.wire import op_bodies
from data_plane.wire.queue import Dialect, FutureState, OpEnvelope, OpKind, future_key, ops_stream, run_pending_key
from tests.trainer.conftest import Driver, sft_batch
from tests.trainer.loops_support import loops_request

DATA = sft_batch(7, n=2)


def send(d: Driver, kind: OpKind, body: bytes, seq: int, dialect: Dialect = Dialect.LOOPS) -> str:
    """``Driver.send`` with a dialect (what the Loops data plane enqueues)."""
    rid = f"{d.run_id}-{seq}-{kind.value}"
    d.r.hset(future_key(rid), mapping={"state": FutureState.PENDING.value})
    d.r.sadd(run_pending_key(d.run_id), rid)
    env = OpEnvelope(request_id=rid, model_id=d.run_id, seq_id=seq, kind=kind, body=body, dialect=dialect)
    d.r.xadd(ops_stream(d.run_id), env.to_fields())
    return rid


def loops_data() -> list[dict]:
    out = []
    for d in DATA:
        t = np.asarray(d["target_tokens"]).copy()
        t[:3] = -100  # the prompt: ignored
        out.append({"tokens": d["tokens"], "target_tokens": t})
    return out


def init_and_step(d: Driver) -> tuple[float, float]:
    assert d.ok_json(send(d, OpKind.INIT_TRAINER, op_bodies.encode(op_bodies.InitTrainerBody(lora_rank=8)), 1)) == {
        "step": 0,
        "lora_rank": 8,
    }
    fb = json.loads(d.result(send(d, OpKind.FORWARD_BACKWARD, loops_request(loops_data()), 2)).body)
    adam = op_bodies.encode(op_bodies.OptimStepBody(op_bodies.AdamSpec(learning_rate=1e-2, grad_clip_norm=1.0)))
    d.ok_json(send(d, OpKind.OPTIM_STEP, adam, 3))
    after = json.loads(
        d.result(send(d, OpKind.FORWARD_BACKWARD, loops_request(loops_data(), forward_only=True), 4)).body
    )
    return fb["loss"], after["loss"]


def test_a_worker_serves_runs_one_after_another(start_worker) -> None:
    a = start_worker("run-a")
    assert a.ok_json(a.create(rank=8, seed=5))["type"] == "create_model"
    first, trained = init_and_step(a)
    assert trained < first
    deadline = time.monotonic() + 30
    while a.run_state().get("next_seq") != "5":  # progress is recorded just after the answer
        assert time.monotonic() < deadline, a.run_state()
        time.sleep(0.02)
    assert a.run_state()["optim_steps"] == "1"
    waiting = a.send(OpKind.OPTIM_STEP, b"{}", seq=9)  # seqs 5..8 never come

    # the next run takes over the deployment: same process, base model still loaded
    b = Driver(a.r, "run-b", "run-b", a.deployment_id, proc=a.proc, _log=a._log)
    b.attach()
    failed = a.result(waiting)
    assert failed.state == FutureState.FAILED and b"run run-b took over" in failed.body
    assert b.ok_json(b.create(rank=8, seed=5))["type"] == "create_model"
    again, _ = init_and_step(b)
    assert again == first  # a fresh adapter with the same seed: nothing of run A leaked
    deadline = time.monotonic() + 30
    while a.run_state().get("state") != "detached":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert b.state()["run_id"] == "run-b" and b.run_state()["state"] == "attached"
    assert a.proc.poll() is None

    # putting the first run back resumes it where it was (its snapshot, then its op log),
    # on the same process; the op that was failed when it was detached is gone from its log
    a.attach()
    fwd = loops_request(loops_data(), forward_only=True)
    back = json.loads(a.result(send(a, OpKind.FORWARD_BACKWARD, fwd, 5)).body)
    assert back["loss"] == pytest.approx(trained, rel=1e-6)
    st = a.run_state()
    assert st["state"] == "attached" and st["resumes"] == "1" and st["optim_steps"] == "1"
    assert a.proc.poll() is None


def test_an_idle_run_is_snapshotted_within_the_interval(start_worker) -> None:
    """The last op before a pause leaves the log within snapshot_interval_s, with no op after
    it (the worker's loop asks whether a snapshot is due on every tick, not only after ops)."""
    d = start_worker("run-idle", snapshot_interval_s=3.0, snapshot_max_ops=1000)
    assert d.ok_json(d.create(rank=8, seed=5))["type"] == "create_model"  # snapshot at seq 1
    init = op_bodies.encode(op_bodies.InitTrainerBody(lora_rank=8))
    assert d.ok_json(send(d, OpKind.INIT_TRAINER, init, 1))["step"] == 0  # then nothing
    deadline = time.monotonic() + 30
    while d.run_state().get("snapshot_seq") != "2":
        assert time.monotonic() < deadline, d.run_state()
        time.sleep(0.05)
    assert d.r.xlen(ops_stream("run-idle")) == 0  # every executed op left the log
