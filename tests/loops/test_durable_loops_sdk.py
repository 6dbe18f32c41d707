"""A durable run through the unmodified Loops SDK (baseten-loops, in its own venv): the trainer
process is SIGKILLed while an op of the run is in flight, the controller restarts it, the new
worker restores the run's snapshot and replays the logged ops after it (docs/durability.md),
and the SDK, which long-polls ``GET /operations/{id}`` (408 while pending), simply gets its
answers late: no error, and every loss equal to an uninterrupted run's.

The client script (clients/durable_steps.py) trains a trainer-only run (no sampler: no vLLM)
for a few forward_backward + optim_step steps with a fixed seed and data. It runs twice against
this module's own live server, which snapshots every 3 ops: once uninterrupted (the reference),
once while this test watches the run in Redis and kills its trainer mid-run.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.catalog import CatalogModel
from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import WorkloadRole
from data_plane.trainer import snapshots
from data_plane.wire import queue as q
from tests.infra.live_runs import (
    history,
    pending,
    rank_pids,
    run_row,
    run_state,
    start_durable_server,
    wait_status,
)
from tests.infra.live_server import LiveServer
from tests.infra.loops_client import ClientProcess, require_loops_python, run_client, start_client
from tests.infra.services import TestServices

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

CLIENT = Path(__file__).parent / "clients" / "durable_steps.py"
STEPS = 6
# kill once the run has executed seq 0 (its creation) and two full steps
KILL_FROM_SEQ = 5


@pytest.fixture(scope="module")
def server(
    services: TestServices, live_model: CatalogModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    require_loops_python()  # before the server starts: a skip then costs nothing
    s = start_durable_server(services, live_model, tmp_path_factory.mktemp("durable-loops-data"), redis_db=10)
    yield s
    s.stop()  # stops the run's trainer process too


@pytest.fixture(scope="module", autouse=True)
def _end_module_runs() -> Iterator[None]:
    """Overrides tests/loops/conftest.py's (which would start the session's live server): this
    module's runs live on its own server, whose trainers end with it."""
    yield


def client_env(server: LiveServer, run_id_file: Path) -> dict[str, str]:
    model = server.model
    return {
        "OPENLOOPS_TEST_MODEL": model.name,
        "OPENLOOPS_TEST_TOKENIZER": model.tokenizer_id or model.source,
        "OPENLOOPS_TEST_STEPS": str(STEPS),
        "OPENLOOPS_TEST_RUN_ID_FILE": str(run_id_file),
    }


@pytest.fixture(scope="module")
def reference(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run: the same script, seed and data."""
    run_id_file = tmp_path_factory.mktemp("reference") / "run-id"
    res = run_client(
        CLIENT, base_url=server.base_url, api_key=server.api_key, env=client_env(server, run_id_file), timeout=900
    )
    assert res.result is not None, res.stdout[-3000:]
    assert len(res.result["losses"]) == STEPS
    run_id = res.result["run_id"]
    assert run_state(server, run_id).get("resumes", "0") == "0"  # nothing interrupted it
    # its trainer need not compete for the CPUs with the interrupted run's
    ended = httpx.post(
        f"{server.base_url}/v1/loops/runs/{run_id}/deactivate",
        headers={"Authorization": f"Api-Key {server.api_key}"},
        timeout=30,
    )
    assert ended.status_code == 200, ended.text
    return res.result


def wait_run_id(client: ClientProcess, run_id_file: Path) -> str:
    deadline = time.monotonic() + 600
    while not run_id_file.exists():
        assert client.running(), "the client exited before it created its run"
        assert time.monotonic() < deadline, "the client created no run"
        time.sleep(0.05)
    return run_id_file.read_text()


def kill_mid_run(server: LiveServer, client: ClientProcess, run_id: str) -> dict[str, Any]:
    """SIGKILL the run's trainer at a moment when ops of the run are in flight.

    To know that without a race, the trainer is first frozen (SIGSTOP): a frozen worker answers
    nothing, so the run's pending set, its progress and its snapshot manifest read then are
    what the kill interrupts. The kill happens once they show ops submitted and unanswered, at
    least KILL_FROM_SEQ ops executed, and a snapshot that does not cover all of them (the new
    worker restores it and replays the rest); otherwise the trainer goes on (SIGCONT) and the
    test looks again."""
    backend = server.runtime.backend
    assert isinstance(backend, LocalProcessBackend)
    dep_id = run_row(server, run_id).deployment_id
    assert dep_id is not None
    prefix = f"snapshots/{server.org_id}/{run_id}"
    deadline = time.monotonic() + 900
    while True:
        assert client.running(), ("the client finished before its trainer could be killed", run_state(server, run_id))
        assert time.monotonic() < deadline, ("no moment to kill the trainer", run_state(server, run_id))
        pid = backend.pid(dep_id, WorkloadRole.TRAINER)
        if pid is None or int(run_state(server, run_id).get("next_seq", 0)) < KILL_FROM_SEQ:
            time.sleep(0.005)
            continue
        os.kill(pid, signal.SIGSTOP)
        try:
            state, in_flight = run_state(server, run_id), pending(server, run_id)
            manifest = snapshots.read_manifest(server.runtime.store, prefix)
        except BaseException:
            os.kill(pid, signal.SIGCONT)
            raise
        if in_flight and manifest is not None and manifest.next_seq < int(state["next_seq"]):
            os.kill(pid, signal.SIGKILL)  # ends the stopped process as it is
            return {"pid": pid, "pending": in_flight, "state": state, "snapshot_seq": manifest.next_seq}
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.005)


def test_the_loops_sdk_trains_through_a_sigkill_of_its_trainer(
    server: LiveServer, reference: dict, tmp_path: Path
) -> None:
    run_id_file = tmp_path / "run-id"
    client = start_client(CLIENT, base_url=server.base_url, api_key=server.api_key, env=client_env(server, run_id_file))
    try:
        run_id = wait_run_id(client, run_id_file)
        killed = kill_mid_run(server, client, run_id)
        res = client.wait(900)  # raises, with the client's stderr, if the SDK saw any error
    finally:
        client.kill()
    assert res.result is not None, res.stdout[-3000:]
    assert res.result["run_id"] == run_id

    # every loss equals the uninterrupted run's
    losses, want = res.result["losses"], reference["losses"]
    assert len(losses) == len(want) == STEPS
    for i, (got, ref) in enumerate(zip(losses, want)):
        assert abs(got - ref) <= 1e-6 * abs(ref), (i, got, ref, losses, want)
    assert res.result["policy_version"] == reference["policy_version"] == STEPS

    # the ops in flight at the kill were answered afterwards (by the new worker)
    for request_id in killed["pending"]:
        answer = server.call(server.runtime.redis.hget(q.future_key(request_id), "state"))
        assert answer == q.FutureState.DONE.value.encode(), (request_id, answer, killed)
    assert not pending(server, run_id)

    # the run was resumed: WAKING_UP, then ACTIVE again, because the trainer was killed
    wait_status(server, run_id, "ACTIVE")
    state = run_state(server, run_id)
    assert int(state["resumes"]) >= 1, state
    went = [(a, b) for a, b, _ in history(server, "run", run_id)]
    assert ("ACTIVE", "WAKING_UP") in went, went
    after_kill = went[went.index(("ACTIVE", "WAKING_UP")) + 1 :]
    assert any(to == "ACTIVE" for _, to in after_kill), went
    dep_id = run_row(server, run_id).deployment_id
    assert dep_id is not None
    reasons = [r or "" for _, _, r in history(server, "deployment", dep_id)]
    assert any("killed by SIGKILL" in r for r in reasons), reasons


def test_two_replicas_train_like_one_through_a_sigkill_of_a_rank(
    server: LiveServer, reference: dict, tmp_path: Path
) -> None:
    """``replicas=2`` from the Loops SDK: the trainer is two data-parallel ranks under torchrun
    (each runs half of every forward_backward; gradients are summed). Rank 1 is killed while an
    op is in flight: the group restarts and resumes, the SDK sees no error, and every loss equals
    the one-replica reference up to summation order."""
    run_id_file = tmp_path / "run-id"
    env = {**client_env(server, run_id_file), "OPENLOOPS_TEST_REPLICAS": "2"}
    client = start_client(CLIENT, base_url=server.base_url, api_key=server.api_key, env=env)
    try:
        run_id = wait_run_id(client, run_id_file)
        assert run_row(server, run_id).replicas == 2
        backend = server.runtime.backend
        assert isinstance(backend, LocalProcessBackend)
        dep_id = run_row(server, run_id).deployment_id
        assert dep_id is not None
        deadline = time.monotonic() + 900
        while not (int(run_state(server, run_id).get("next_seq", 0)) >= KILL_FROM_SEQ and pending(server, run_id)):
            assert client.running() and time.monotonic() < deadline, run_state(server, run_id)
            time.sleep(0.005)
        pid = backend.pid(dep_id, WorkloadRole.TRAINER)
        assert pid is not None
        os.kill(rank_pids(pid, world=2)[1], signal.SIGKILL)
        res = client.wait(900)
    finally:
        client.kill()
    assert res.result is not None, res.stdout[-3000:]
    losses, want = res.result["losses"], reference["losses"]
    assert len(losses) == len(want) == STEPS
    for i, (got, ref) in enumerate(zip(losses, want)):
        assert abs(got - ref) <= 1e-4 * abs(ref), (i, got, ref, losses, want)
    assert res.result["policy_version"] == STEPS
    assert int(run_state(server, run_id)["resumes"]) >= 1
    reasons = [r or "" for _, _, r in history(server, "deployment", dep_id)]
    assert any("restarting the trainer" in r for r in reasons), reasons
