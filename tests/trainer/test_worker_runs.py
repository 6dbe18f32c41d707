"""One trainer worker subprocess serving a deployment's runs one after another, driven only
through the Redis contract: attach events, Loops-dialect ops, the switch to the next run (its
waiting ops fail, its adapter starts fresh on the loaded base), and the restart check. The
runs' own activation checkpointing modes are checked on a worker in this process (whose model
the test can count calls in)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import redis

from data_plane.trainer.activation_checkpointing import decoder_layers
from data_plane.trainer.worker import Worker
from data_plane.wire import op_bodies
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.queue import (
    Dialect,
    FutureState,
    OpEnvelope,
    OpKind,
    future_key,
    ops_stream,
    run_pending_key,
    worker_state_key,
)
from data_plane.wire.worker_config import StoreSpec, TrainerLaunch
from tests.trainer.conftest import Driver, fwd_request, sft_batch
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


# ---- a run's activation checkpointing mode, on a worker in this process ---------------------


@pytest.fixture
def worker_in_process(valkey_url, tiny_model, store_root):
    """A :class:`Worker` whose loop runs in a thread of this process (so that a test can count
    calls inside its model); returns ``(worker, deployment_id)`` once the base is loaded."""
    threads: list[tuple[Worker, threading.Thread]] = []

    def start(deployment_id: str, **launch_options) -> Worker:
        launch = TrainerLaunch(
            deployment_id=deployment_id,
            base_model="openloops/tiny",
            model_source=str(tiny_model),
            redis_url=valkey_url,
            store=StoreSpec(kind="local", root=str(store_root)),
            max_seq_len=256,
            device="cpu",
            **launch_options,
        )
        w = Worker(launch, client=redis.Redis.from_url(valkey_url))
        t = threading.Thread(target=w.run_forever, name=f"worker-{deployment_id}", daemon=True)
        t.start()
        threads.append((w, t))
        deadline = time.monotonic() + 120
        while w.model is None or w.r.hget(worker_state_key(deployment_id), "state") != b"ready":
            assert t.is_alive() and time.monotonic() < deadline, "the worker never became ready"
            time.sleep(0.02)
        return w

    yield start
    for w, t in threads:
        w.stopping = True  # the loop sees it within one XREAD block
        t.join(60)


def create_with(d: Driver, checkpointing: str | None) -> None:
    body = op_bodies.CreateBody(op_bodies.LoraSpec(rank=8, seed=5), activation_checkpointing=checkpointing)
    assert d.ok_json(d.send(OpKind.CREATE, op_bodies.encode(body)))["type"] == "create_model"


def loss_of(out: pb.ForwardBackwardOutput) -> float:
    return out.metrics["loss:sum"]


def wait_run_state(d: Driver, key: str, value: str) -> None:
    deadline = time.monotonic() + 60
    while d.run_state().get(key) != value:
        assert time.monotonic() < deadline, d.run_state()
        time.sleep(0.02)


def test_each_run_on_a_worker_gets_its_own_activation_checkpointing(worker_in_process, monkeypatch) -> None:
    """One worker (default off) serves a run that chose ``on``, then one that chose ``off``: the
    first recomputes its decoder layers in every backward pass, the second does not, and the
    losses are the same. The first run, put back on the worker, resumes from its snapshot
    (seq 0 left the op log with it) and still recomputes."""
    w = worker_in_process("dep-ckpt", activation_checkpointing="off", snapshot_max_ops=1)
    assert w.model is not None
    mlp = decoder_layers(w.model.base)[0].mlp  # called by the layer's forward, recompute included
    calls = {"n": 0}
    real = mlp.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", counting)

    def train(d: Driver) -> tuple[int, float, float]:
        """(layer-0 MLP calls in one forward_backward, its loss, the loss after a step)."""
        calls["n"] = 0
        loss = loss_of(d.ok_proto(d.fwd(DATA)))
        n = calls["n"]
        d.ok_json(d.optim())
        return n, loss, loss_of(d.ok_proto(d.fwd(DATA, forward_only=True)))

    r = w.r
    on = Driver(r, "run-ckpt-on", "run-ckpt-on", "dep-ckpt")
    on.attach()
    create_with(on, "on")
    on_calls, on_loss, on_after = train(on)
    wait_run_state(on, "snapshot_seq", "4")  # every executed op, seq 0 included, is in a snapshot
    assert r.xlen(ops_stream(on.run_id)) == 0

    off = Driver(r, "run-ckpt-off", "run-ckpt-off", "dep-ckpt")
    off.attach()
    create_with(off, "off")
    off_calls, off_loss, off_after = train(off)

    assert (on_calls, off_calls) == (2, 1)  # once more per backward with checkpointing, once without
    assert on_loss == off_loss  # the same computation: checkpointing changes memory, not results
    assert on_after == pytest.approx(off_after, rel=1e-6)

    # the first run again: its mode comes back from its snapshot (the worker's default is off)
    on.attach()
    wait_run_state(on, "state", "attached")
    assert on.run_state()["resumes"] == "1"
    calls["n"] = 0
    assert loss_of(on.ok_proto(on.send(OpKind.FORWARD_BACKWARD, fwd_request(DATA), seq=4))) == pytest.approx(
        on_after, rel=1e-6
    )
    assert calls["n"] == 2
    assert w.model.engine is not None and w.model.engine.checkpointing.mode == "on"
