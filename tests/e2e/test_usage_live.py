"""Usage against real workers: a new org trains through the unmodified tinker SDK, samples from
its weights through vLLM, and ends its run; GET /v1/loops/usage then reports the trainer's
worker-seconds within a few seconds of the trainer process's real lifetime (from /proc), and
exactly the tokens trained (the model inputs sent) and sampled (the sequences returned)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from control_plane.db.models import Deployment
from tests.e2e.sft import TEXT, datum
from tests.infra.live_runs import new_tenant, run_row, trainer_pid, wait_status
from tests.infra.live_server import LiveServer
from tests.sampler.live import LiveStack

pytestmark = pytest.mark.timeout(900)

# the controller writes a status change on the pass that observes it: the trainer's row starts
# running before its process does and stops after it has gone, by about a pass each
LIFETIME_SLACK_S = 5.0


def started_at(pid: int) -> float:
    """The process's start, seconds since the epoch (/proc/<pid>/stat field 22, in clock ticks
    after boot)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_usage_matches_a_trainers_lifetime_and_the_tokens_trained_and_sampled(stack: LiveStack) -> None:
    server = stack.server
    key = new_tenant(server, "usage-live")  # an org of its own: its totals are this test's
    headers = {"Authorization": f"Bearer {key}"}
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    service = tinker.ServiceClient(base_url=stack.base_url, api_key=key)
    tc = service.create_lora_training_client(stack.base_model, rank=4, seed=2).result()
    run_id = str(tc.model_id)
    pid = trainer_pid(server, run_id)
    born = started_at(pid)
    tok = tc.get_tokenizer()

    trained = 0
    for i in range(3):
        data = [datum(tok, TEXT), datum(tok, TEXT * (2 + i))]
        trained += sum(d.model_input.length for d in data)
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt = tok.encode(TEXT)[:5]
    res = sc.sample(
        prompt=types.ModelInput.from_ints(prompt),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=6, seed=4, temperature=1.0, stop=[]),
    ).result()
    generated = sum(len(s.tokens) for s in res.sequences)
    time.sleep(3)  # a lifetime long enough that the slack is small beside it

    r = httpx.post(f"{stack.base_url}/v1/loops/runs/{run_id}/deactivate", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while not gone(pid):
        assert time.monotonic() < deadline, "the trainer did not stop"
        time.sleep(0.05)
    died = time.time()
    wait_status(server, run_id, "INACTIVE")
    dep_id = run_row(server, run_id).deployment_id
    assert dep_id is not None

    def report() -> dict:
        server.call(server.runtime.meter.flush())
        r = httpx.get(f"{stack.base_url}/v1/loops/usage", headers=headers, params={"start": since}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    deadline = time.monotonic() + 120
    while True:  # the deployment's INACTIVE and the telemetry of the last step land on their own passes
        u = report()
        dep_done = server.call(_status(server, dep_id)) == "INACTIVE"
        if dep_done and u["totals"]["training_steps"] == 3:
            break
        assert time.monotonic() < deadline, (u, dep_done)
        time.sleep(0.5)

    lifetime = died - born
    trainer_s = u["totals"]["worker_seconds_by_kind"]["trainer"]["cpu"]
    assert abs(trainer_s - lifetime) <= LIFETIME_SLACK_S, (trainer_s, lifetime)
    (run,) = [i for i in u["items"] if i.get("kind") == "run"]
    assert run["run_id"] == run_id
    # the run's share: its deployment's time from the run's creation until it ended
    assert 0 < run["worker_seconds"]["cpu"] <= trainer_s + 1e-3
    assert run["worker_seconds"]["cpu"] >= lifetime - 2 * LIFETIME_SLACK_S
    assert run["tokens_trained"] == trained and run["training_steps"] == 3
    assert run["sampling"] == {
        "requests": 1,
        "errors": 0,
        "samples": 2,
        "prompt_tokens": len(prompt),
        "completion_tokens": generated,
    }
    assert u["totals"]["tokens_trained"] == trained
    assert u["totals"]["worker_seconds_by_kind"]["sampler"]["cpu"] > 0  # its sampling session's sampler


async def _status(server: LiveServer, dep_id: str) -> str:
    async with server.runtime.db.session() as s:
        dep = await s.get(Deployment, dep_id)
        assert dep is not None
        return dep.status
