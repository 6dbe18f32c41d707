"""tinker-cookbook's supervised recipe through the Loops Tinker shim: the flow of
tests/loops/clients/cookbook_sft.py (``tinker_cookbook.supervised.train.main`` over four
conversations of the cookbook's example_data/conversations.jsonl, one batch a step, three epochs,
configured only by LOOPS_BASE_URL / BASETEN_API_KEY) against the session's live server, checked
against the recipe's own logs and what the server's Loops management API lists. The recipe never
samples (no evaluators), so no vLLM is needed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(900)
CLIENTS = Path(__file__).parent / "clients"
EPOCHS = 3  # one batch of four conversations per epoch: three steps over the same data
CONVERSATIONS = 4


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def recipe(loops_client, live_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    model = live_server.model
    work = tmp_path_factory.mktemp("cookbook-shim")
    env = {
        "OPENLOOPS_TEST_MODEL": model.name,
        "OPENLOOPS_TEST_TOKENIZER": model.tokenizer_id or model.source,
        "OPENLOOPS_TEST_CONVERSATIONS": str(CONVERSATIONS),
        "OPENLOOPS_TEST_BATCH_SIZE": str(CONVERSATIONS),
        "OPENLOOPS_TEST_EPOCHS": str(EPOCHS),
        "OPENLOOPS_TEST_LR": "1e-2",
    }
    res = loops_client.run(CLIENTS / "cookbook_sft.py", env=env, timeout=800, cwd=work)
    assert res.result is not None, res.stdout[-3000:]
    assert "Training completed successfully" in res.stderr, res.stderr[-3000:]
    log = Path(res.result["log_path"])
    assert log.parent == work
    return {
        **res.result,
        "metrics": _jsonl(log / "metrics.jsonl"),
        "checkpoints": _jsonl(log / "checkpoints.jsonl"),
    }


@pytest.fixture(scope="module")
def run_id(recipe: dict) -> str:
    assert len(recipe["run_ids"]) == 1, recipe["run_ids"]  # one trainer for the whole recipe
    return recipe["run_ids"][0]


def _get(live_server, path: str, **params: str) -> dict:
    r = httpx.get(
        f"{live_server.base_url}{path}",
        params=params,
        headers={"Authorization": f"Api-Key {live_server.api_key}"},
        timeout=30,
    )
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def test_every_step_is_logged_with_the_optimizer_metrics(recipe: dict) -> None:
    metrics = recipe["metrics"]
    assert [m["step"] for m in metrics] == list(range(EPOCHS))
    assert [m["epoch"] for m in metrics] == list(range(EPOCHS))
    for m in metrics:
        assert m["num_sequences"] == CONVERSATIONS and m["num_tokens"] > 0
        # the cookbook's "mean" reduction: every conversation's weights sum to 1
        assert m["num_loss_tokens"] == pytest.approx(CONVERSATIONS, rel=1e-4)
        # optim_step's metrics, merged into the step's row
        assert math.isfinite(m["grad_norm:mean"]) and m["grad_norm:mean"] > 0
        assert m["learning_rate:mean"] == pytest.approx(m["learning_rate"], rel=1e-5)
    assert metrics[-1]["progress"] == 1.0


def test_train_bits_per_byte_fall(recipe: dict) -> None:
    # bpb is the recipe's NLL over the trained (weight > 0) tokens per byte
    bpb = [m["train_mean_bpb"] for m in recipe["metrics"]]
    assert all(math.isfinite(x) and x > 0 for x in bpb), bpb
    assert bpb[-1] < bpb[0], bpb


def test_train_mean_nll_is_finite_and_falls(recipe: dict) -> None:
    # compute_mean_nll dots the forward_backward logprobs with the weights over EVERY position,
    # so one null (NaN) logprob at a weight-0 position (the prompt) makes it NaN
    nll = [m["train_mean_nll"] for m in recipe["metrics"]]
    assert all(math.isfinite(x) and x > 0 for x in nll), nll
    assert nll[-1] < nll[0], nll


def test_final_checkpoint_is_listed_by_the_server(recipe: dict, run_id: str, live_server) -> None:
    final = recipe["checkpoints"][-1]
    assert final["name"] == "final" and final["epoch"] == EPOCHS
    assert final["state_path"] == f"bt://loops:{run_id}/weights/final"
    assert final["sampler_path"] == f"bt://loops:{run_id}/sampler_weights/final"
    listed = _get(live_server, "/v1/loops/checkpoints", run_id=run_id)["checkpoints"]
    by_path = {c["checkpoint_path"]: c for c in listed}
    for path, target in ((final["state_path"], "trainer"), (final["sampler_path"], "sampler")):
        assert path in by_path, sorted(by_path)
        c = by_path[path]
        assert (c["run_id"], c["checkpoint_id"], c["target"]) == (run_id, "final", target)
        assert c["base_model"] == live_server.model.name and c["lora_adapter_config"]["rank"] == 8
        assert c["size_bytes"] > 0


def test_run_is_listed_by_the_server(run_id: str, live_server) -> None:
    runs = {r["id"]: r for r in _get(live_server, "/v1/loops/runs")["runs"]}
    assert run_id in runs, sorted(runs)
    run = runs[run_id]
    assert run["base_model"] == live_server.model.name and run["lora_rank"] == 8
