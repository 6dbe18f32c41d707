"""A trainer of two ranks (the base model sharded with FSDP2, under torchrun) behind a live
server, through the unmodified tinker SDK: one rank is SIGKILLed in the middle of a step (the
follower during a forward_backward, then the leader during an optim_step). torchrun ends the
group, the controller restarts it, and the run resumes from its snapshot and op log
(docs/durability.md): the SDK never sees an error and every loss equals an uninterrupted run's on
the same two-rank trainer (relative difference <= 1e-6). (Two ranks against one:
tests/trainer/test_ranks.py.)"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker
from tinker import types

from control_plane.catalog import CatalogModel
from tests.e2e.sft import datum
from tests.infra.live_runs import (
    history,
    rank_pids,
    run_row,
    run_state,
    start_durable_server,
    trainer_pid,
    wait_status,
)
from tests.infra.live_server import LiveServer
from tests.infra.services import TestServices

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SEED = 11
STEPS = 6
LR = 2e-2
TEXTS = [
    "two ranks hold half of every decoder layer each",
    "the leader reads the op stream and the follower does what it says",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


@pytest.fixture(scope="module")
def server(
    services: TestServices, live_model: CatalogModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    s = start_durable_server(services, live_model, tmp_path_factory.mktemp("ranks-data"), redis_db=11, trainer_ranks=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def service(server: LiveServer) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    yield client
    client.close("interrupted").result()


def train(
    server: LiveServer, service: tinker.ServiceClient, kills: dict[tuple[int, str], int]
) -> tuple[str, list[float]]:
    """STEPS steps; ``kills[(step, "fb" | "optim")] = rank``: SIGKILL that rank of the run's
    trainer right after submitting that op of that step."""
    tc = service.create_lora_training_client(server.model.name, rank=4, seed=SEED).result()
    tok = tc.get_tokenizer()
    run_id = str(tc.model_id)
    losses = []

    def maybe_kill(step: int, op: str) -> None:
        rank = kills.get((step, op))
        if rank is not None:
            os.kill(rank_pids(trainer_pid(server, run_id), world=2)[rank], signal.SIGKILL)

    for step in range(STEPS):
        data = [datum(tok, TEXTS[(step + i) % len(TEXTS)] * 2) for i in range(4)]
        fb = tc.forward_backward(data, "cross_entropy")
        maybe_kill(step, "fb")
        opt = tc.optim_step(types.AdamParams(learning_rate=LR))
        maybe_kill(step, "optim")
        losses.append(float(fb.result().metrics["loss:sum"]))
        opt.result()
    return run_id, losses


def test_a_rank_killed_mid_step_restarts_the_group_and_nothing_is_lost(
    server: LiveServer, service: tinker.ServiceClient
) -> None:
    ref_id, reference = train(server, service, {})
    # the trainer really is two ranks, the base sharded between them
    pids = rank_pids(trainer_pid(server, ref_id), world=2)
    assert sorted(pids) == [0, 1]
    # ... each allocating with jemalloc (OPENLOOPS_TRAINER_ALLOCATOR's default; scripts/install
    # puts the library in)
    for pid in pids.values():
        assert "libjemalloc" in Path(f"/proc/{pid}/maps").read_text(), pid
    assert run_state(server, ref_id).get("resumes", "0") == "0"

    run_id, losses = train(server, service, {(1, "fb"): 1, (3, "optim"): 0})
    for i, (got, want) in enumerate(zip(losses, reference, strict=True)):
        assert abs(got - want) <= 1e-6 * abs(want), (i, got, want, losses, reference)
    state = run_state(server, run_id)
    assert int(state["resumes"]) >= 2, state
    # the ops resume as soon as the restarted leader has restored the run; the controller marks
    # the run ACTIVE on its next pass after that
    assert wait_status(server, run_id, "ACTIVE", "FAILED") == "ACTIVE", run_row(server, run_id)
    went = history(server, "run", run_id)
    assert sum(1 for _, to, _ in went if to == "WAKING_UP") >= 2, went
