"""Durable runs through the unmodified tinker SDK against a live server (real trainer worker
subprocesses, real Postgres/Redis, local object store; docs/durability.md).

Every scenario trains a fresh run with the same seed and data as an uninterrupted reference
run and interrupts it: SIGKILL of the trainer during forward_backward, during optim_step and
during save_state; two kills in a row; the whole server (API and controller) restarted while
a resume is in flight and the client polls; the run scaled to zero while idle and woken by
its next op. The SDK must never see an error, every loss must match the reference (relative
difference <= 1e-6), and the run's history must show where it went (WAKING_UP and back).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import tinker
from sqlalchemy import select, update
from tinker import types

from control_plane.db.models import Checkpoint, Deployment
from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import WorkloadRole
from data_plane.trainer import snapshots
from data_plane.wire import queue as q
from tests.e2e.sft import datum
from tests.infra.live_runs import (
    history,
    in_transaction,
    run_row,
    run_state,
    start_durable_server,
    trainer_pid,
    wait_status,
)
from tests.infra.live_server import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SEED = 7
STEPS = 8
LR = 2e-2
TEXTS = [
    "the cat sat on the mat and the cat sat on the mat again",
    "openloops keeps a log of every op until a snapshot covers it",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "one two three four five six seven eight nine ten",
]


@pytest.fixture(scope="module")
def server(services, live_model, tmp_path_factory: pytest.TempPathFactory):
    s = start_durable_server(services, live_model, tmp_path_factory.mktemp("durable-data"), redis_db=9)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def service(server: LiveServer):
    client = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    yield client
    client.close("interrupted").result()  # stops its session heartbeats before the server goes


def batch(tok: Any, step: int) -> list[types.Datum]:
    return [datum(tok, TEXTS[(step + i) % len(TEXTS)] * 3) for i in range(4)]


class Trainer:
    """One run's steps; ``before`` hooks interrupt it at chosen points."""

    def __init__(self, server: LiveServer, service: tinker.ServiceClient) -> None:
        self.server = server
        self.tc = service.create_lora_training_client(server.model.name, rank=4, seed=SEED).result()
        self.tok = self.tc.get_tokenizer()
        self.losses: list[float] = []

    @property
    def run_id(self) -> str:
        return str(self.tc.model_id)

    def step(
        self, i: int, *, after_fb: Callable[[], object] | None = None, after_optim: Callable[[], object] | None = None
    ) -> None:
        fb = self.tc.forward_backward(batch(self.tok, i), "cross_entropy")
        if after_fb:
            after_fb()
        opt = self.tc.optim_step(types.AdamParams(learning_rate=LR))
        if after_optim:
            after_optim()
        self.losses.append(float(fb.result().metrics["loss:sum"]))
        opt.result()


@pytest.fixture(scope="module")
def reference(server: LiveServer, service: tinker.ServiceClient) -> list[float]:
    """The uninterrupted run's losses."""
    t = Trainer(server, service)
    for i in range(STEPS):
        t.step(i)
    return t.losses


def wait_pending(server: LiveServer, run_id: str) -> None:
    """Until the run has an op in flight (submitted, not answered)."""
    deadline = time.monotonic() + 30
    while not server.call(server.runtime.redis.scard(q.run_pending_key(run_id))):
        assert time.monotonic() < deadline, "no op in flight"
        time.sleep(0.005)


def kill(server: LiveServer, run_id: str, *, when_pending: bool = True) -> int:
    if when_pending:
        wait_pending(server, run_id)
    pid = trainer_pid(server, run_id)
    os.kill(pid, signal.SIGKILL)
    return pid


def assert_matches(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference)
    for i, (got, want) in enumerate(zip(losses, reference)):
        assert abs(got - want) <= 1e-6 * abs(want), (i, got, want)


def test_sigkill_during_each_kind_of_op_and_twice_in_a_row(
    server: LiveServer, service: tinker.ServiceClient, reference: list[float]
) -> None:
    t = Trainer(server, service)
    t.step(0)
    t.step(1, after_fb=lambda: kill(server, t.run_id))  # during forward_backward
    t.step(2, after_optim=lambda: kill(server, t.run_id))  # during optim_step
    # during save_state: the checkpoint is written once and listed, its future answered
    save = t.tc.save_state("mid")
    kill(server, t.run_id)
    path = save.result().path
    assert path == f"tinker://{t.run_id}/weights/mid"
    t.step(3)

    # twice in a row: the trainer that replaced the killed one is killed while it restores
    def twice() -> None:
        first = kill(server, t.run_id)
        deadline = time.monotonic() + 120
        while (second := trainer_pid(server, t.run_id)) == first:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(second, signal.SIGKILL)

    t.step(4, after_fb=twice)
    for i in range(5, STEPS):
        t.step(i)
    assert_matches(t.losses, reference)

    state = run_state(server, t.run_id)
    assert int(state["resumes"]) >= 4, state  # every kill was followed by a resume
    # ACTIVE on the controller's next pass after the last restore (the ops need not wait for it)
    assert wait_status(server, t.run_id, "ACTIVE", "FAILED") == "ACTIVE", run_row(server, t.run_id)
    went = history(server, "run", t.run_id)
    assert sum(1 for _, to, _ in went if to == "WAKING_UP") >= 4, went
    dep_id = run_row(server, t.run_id).deployment_id
    assert dep_id is not None
    reasons = [r or "" for _, _, r in history(server, "deployment", dep_id)]
    assert any("killed by SIGKILL" in r and "attempt 2 of 3" in r for r in reasons), reasons
    ckpts = (
        in_transaction(server, lambda s: s.execute(select(Checkpoint.name).where(Checkpoint.run_id == t.run_id)))
        .scalars()
        .all()
    )
    assert list(ckpts) == ["mid"]
    # and the checkpoint saved mid-way resumes a new run at that point (fork)
    fork = service.create_training_client_from_state_with_optimizer(path).result()
    forked = fork.forward_backward(batch(t.tok, 3), "cross_entropy").result()
    assert abs(float(forked.metrics["loss:sum"]) - reference[3]) <= 1e-6 * abs(reference[3])


def test_server_restart_during_a_resume_then_scale_to_zero_and_wake(
    server: LiveServer, service: tinker.ServiceClient, reference: list[float]
) -> None:
    t = Trainer(server, service)
    t.step(0)
    t.step(1)

    # the trainer dies, and while it is being resumed (WAKING_UP) the whole server restarts:
    # the client keeps polling its forward_backward through the outage
    def restart_mid_resume() -> None:
        kill(server, t.run_id)
        wait_status(server, t.run_id, "WAKING_UP")
        server.stop()
        server.start()

    t.step(2, after_fb=restart_mid_resume)
    t.step(3)
    assert wait_status(server, t.run_id, "ACTIVE") == "ACTIVE"

    # idle past its scale_down_delay_seconds: the trainer snapshots and stops
    dep_id = run_row(server, t.run_id).deployment_id
    assert dep_id is not None
    in_transaction(
        server,
        lambda s: s.execute(update(Deployment).where(Deployment.id == dep_id).values(scale_down_delay_seconds=2)),
    )
    wait_status(server, t.run_id, "SCALED_TO_ZERO", timeout_s=120)
    backend = server.runtime.backend
    assert isinstance(backend, LocalProcessBackend)
    deadline = time.monotonic() + 60
    while backend.pid(dep_id, WorkloadRole.TRAINER) is not None:
        assert time.monotonic() < deadline, "the trainer process is still there"
        time.sleep(0.1)
    state = run_state(server, t.run_id)
    manifest = snapshots.read_manifest(server.runtime.store, f"snapshots/{server.org_id}/{t.run_id}")
    assert manifest is not None and manifest.next_seq == int(state["next_seq"]), (manifest, state)
    assert server.call(server.runtime.redis.xlen(q.ops_stream(t.run_id))) == 0  # the log is all in the snapshot
    # the next op wakes it and completes
    for i in range(4, STEPS):
        t.step(i)
    assert_matches(t.losses, reference)
    went = [(a, b) for a, b, _ in history(server, "run", t.run_id)]
    i = went.index(("ACTIVE", "SCALED_TO_ZERO"))
    assert ("SCALED_TO_ZERO", "WAKING_UP") in went[i:] and went[-1][1] == "ACTIVE", went
