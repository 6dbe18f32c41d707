"""Older releases of the `tinker` SDK train and sample through openloops: for each version in
older_tinker_sdks.txt, tests/e2e/clients/tinker_flow.py runs with that release's own virtualenv
(.venvs/tinker-<version>, built by `scripts/install test`) against the session's live server and
shared vLLM sampler, and its results are checked here. The system environment's tinker (0.38) is
what every other test uses."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.loops_client import REPO_ROOT, run_client
from tests.sampler.live import LiveStack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # slow: `stack` comes through getfixturevalue
HERE = Path(__file__).parent
VERSIONS = [
    line.strip()
    for line in (HERE / "older_tinker_sdks.txt").read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]
# Trainer forward vs vLLM prompt logprobs on the same adapter (see test_train_then_sample.py)
LOGPROB_ATOL = 1e-3


def sdk_python(version: str) -> Path:
    """The venv's interpreter: skips without it, but fails under CI (``CI=true``), whose
    ``scripts/test`` builds it, so that a broken install cannot pass as skipped tests."""
    venv = REPO_ROOT / ".venvs" / f"tinker-{version}"
    python = venv / "bin" / "python"
    if python.exists() and (venv / ".openloops-requirements").exists():  # the install's last step
        return python
    msg = f"the tinker {version} venv ({venv.relative_to(REPO_ROOT)}) is not installed: run `scripts/install test`"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _active_runs(stack: LiveStack) -> set[str]:
    with stack.http() as c:
        runs = c.get("/v1/loops/runs", params={"scope": "org"}).json()["runs"]
    return {r["id"] for r in runs if r["status"]["name"] not in ("INACTIVE", "FAILED", "DEACTIVATING")}


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"tinker-{v}" for v in VERSIONS])
def flow(request: pytest.FixtureRequest) -> Iterator[dict]:
    """One version's client run. Its runs are deactivated afterwards: older SDKs cannot close a
    session, which would otherwise keep their trainer workers up until it expires."""
    version: str = request.param
    python = sdk_python(version)  # before the stack starts: a skip then costs nothing
    stack: LiveStack = request.getfixturevalue("stack")
    before = _active_runs(stack)
    try:
        yield _run_flow(stack, python, version)
    finally:
        with stack.http() as c:
            for run_id in _active_runs(stack) - before:
                c.post(f"/v1/loops/runs/{run_id}/deactivate")


def _run_flow(stack: LiveStack, python: Path, version: str) -> dict:
    env = {
        "TINKER_BASE_URL": stack.base_url,
        "TINKER_API_KEY": stack.api_key,
        "OPENLOOPS_TEST_MODEL": stack.base_model,
    }
    res = run_client(
        HERE / "clients" / "tinker_flow.py",
        base_url=stack.base_url,
        api_key=stack.api_key,
        env=env,
        timeout=800,
        python=python,
    )
    assert res.result is not None, res.stdout[-3000:]
    assert res.result["sdk_version"] == version
    return res.result


def test_training_loss_falls(flow: dict, stack: LiveStack) -> None:
    assert stack.base_model in flow["models"]
    assert ":train:" in flow["model_id"]
    losses = flow["losses"]
    assert flow["all_finite"] and len(losses) == 4
    assert losses[-1] < losses[0], losses
    assert flow["forward_loss"] < losses[0]
    assert flow["logprob_lens"] == [flow["expected_lens"]] * 4


def test_checkpoints_and_restore(flow: dict) -> None:
    run = flow["model_id"]
    assert flow["state_path"] == f"tinker://{run}/weights/state-4"
    assert flow["sampler_path"] == f"tinker://{run}/sampler_weights/sampler-4"
    assert {"weights/state-4", "sampler_weights/sampler-4"} <= set(flow["checkpoints"])
    assert flow["restored_model_id"] != run and ":train:" in flow["restored_model_id"]
    assert math.isclose(flow["restored_forward_loss"], flow["forward_loss"], rel_tol=1e-5, abs_tol=1e-5)


def test_sampling_the_trained_weights(flow: dict) -> None:
    # vLLM serves the trained adapter: its logprobs are the trainer's, and the text got likelier
    assert flow["trainer_vs_sampler_max_abs_diff"] < LOGPROB_ATOL
    assert flow["logprob_trained"] > flow["logprob_base"] + 1.0
    assert len(flow["greedy_trained"]) == len(flow["greedy_base"]) == 12
    assert flow["greedy_snapshot"] == flow["greedy_trained"]  # same weights, unnamed snapshot
    assert len(flow["samples"]) == 2
    for s in flow["samples"]:
        assert len(s["tokens"]) == 6 and len(s["logprobs"]) == 6
        assert all(lp <= 0 for lp in s["logprobs"])
