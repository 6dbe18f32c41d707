"""bench.trainer_sdk's Loops-SDK row: the table renders it (or says why it is missing), the
driver (bench/loops_sdk.py) finds the venv and checks the client's JSON, and the client script
(bench/clients/loops_steps.py) runs in the Loops venv against the session's live server with a
small batch and reports what the benchmark reads, the worker's telemetry for its run included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench import trainer_sdk
from bench.batch import BATCH, SEQ
from bench.loops_sdk import client_env, last_json_object, loops_python, missing_venv_note, parse_result, run_client
from bench.trainer_sdk import SdkResult, table, worker_step_times
from tests.infra.loops_client import require_loops_python

TINKER = SdkResult(
    step_times=[0.41, 0.40, 0.42],
    first_step_s=5.1,
    worker_peak_rss_mib=1035.0,
    small_op_times=[0.010] * 9 + [0.030],
    worker_step_times=[0.39, 0.39, 0.38],
)
LOOPS = SdkResult(
    step_times=[0.45, 0.44, 0.46],
    first_step_s=6.2,
    worker_peak_rss_mib=1040.0,
    small_op_times=[0.012] * 9 + [0.040],
    worker_step_times=[0.40, 0.40, 0.41],
    sdk="Loops SDK",
    version="baseten-loops 0.32.0",
)
PEFT, PEFT_SMALL, ENGINE_S = [0.5, 0.5, 0.5], [0.002] * 10, 0.38


def _openloops_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| openloops via")]


def test_the_table_has_a_loops_sdk_row_and_its_round_trip() -> None:
    text = table("tiny", TINKER, PEFT, PEFT_SMALL, ENGINE_S, LOOPS)
    tok = BATCH * SEQ
    assert _openloops_rows(text) == [
        f"| openloops via tinker SDK | 0.410 | {tok / 0.41:,.0f} | {0.5 / 0.41:.2f} |",
        f"| openloops via Loops SDK (baseten-loops 0.32.0) | 0.450 | {tok / 0.45:,.0f} | {0.5 / 0.45:.2f} |",
    ]
    # own time: median step minus the worker's median time in the ops, per SDK
    assert "+20.0 ms (+5.1% of the worker's 0.390 s) through the tinker SDK" in text
    assert "+50.0 ms (+12.5% of the worker's 0.400 s) through the Loops SDK" in text
    assert "p50 10.0 ms, p90 30.0 ms through the tinker SDK; p50 12.0 ms, p90 40.0 ms through the Loops SDK" in text
    assert "first step 5.1 s (Loops SDK: 6.2 s)" in text
    assert "1,035 MiB (Loops SDK run: 1,040 MiB)" in text
    assert "No Loops-SDK row" not in text


def test_without_the_venv_the_table_says_why_and_how_to_install_it(tmp_path: Path) -> None:
    note = missing_venv_note(tmp_path / "loops-client")
    text = table("tiny", TINKER, PEFT, PEFT_SMALL, ENGINE_S, note)
    assert _openloops_rows(text) == [f"| openloops via tinker SDK | 0.410 | {BATCH * SEQ / 0.41:,.0f} | 1.22 |"]
    assert "through the Loops SDK" not in text
    assert f"No Loops-SDK row: {note}." in text and "scripts/install test" in text


def test_bench_loops_skips_without_the_venv_before_starting_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_sdk, "loops_python", lambda: loops_python(tmp_path / "absent"))
    tokens = np.zeros((2, 9), dtype=np.int64)
    out = trainer_sdk.bench_loops(None, None, tokens, steps=1, warmup=0)  # type: ignore[arg-type]
    assert isinstance(out, str) and "scripts/install test" in out


def test_a_half_built_venv_is_not_used(tmp_path: Path) -> None:
    venv = tmp_path / "loops-client"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert loops_python(venv) is None  # no marker: scripts/install has not finished
    (venv / ".openloops-requirements").write_text("")
    assert loops_python(venv) == venv / "bin" / "python"


def _good() -> dict:
    return {
        "sdk": "baseten-loops 0.32.0",
        "run_id": "run-1",
        "ready_s": 4.0,
        "first_step_s": 4.5,
        "warmup_step_times": [0.5],
        "step_times": [0.4, 0.41],
        "losses": [9.1, 9.0, 8.9],
        "tokens": 8192,
        "small_op_times": [0.01, 0.012],
    }


def test_parse_result_takes_the_last_json_object_of_stdout() -> None:
    older = {**_good(), "run_id": "older"}
    stdout = f"progress\n{json.dumps(older)}\n[1, 2]\n{{not json\n{json.dumps(_good())}\nbye\n"
    assert parse_result(stdout) == _good()
    assert last_json_object("no json here\n[1]\n") is None


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda r: r.pop("small_op_times"), "lacks"),
        (lambda r: r.update(step_times=[]), "step_times"),
        (lambda r: r.update(small_op_times=[0.01, float("nan")]), "small_op_times"),
        (lambda r: r.update(step_times=[0.4, -1.0]), "step_times"),
        (lambda r: r.update(step_times=[True]), "step_times"),
        (lambda r: r.update(first_step_s=None), "first_step_s"),
    ],
)
def test_parse_result_refuses_a_result_the_table_cannot_use(change, error: str) -> None:
    r = _good()
    change(r)
    with pytest.raises(ValueError, match=error):
        parse_result(json.dumps(r))
    with pytest.raises(ValueError, match="no JSON object"):
        parse_result("Traceback ...\n")


def test_the_client_env_configures_only_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPS_BASE_URL", "http://elsewhere")
    monkeypatch.setenv("BASETEN_LOOPS_SCOPE", "team")
    monkeypatch.setenv("PYTHONPATH", "/work")
    env = client_env("http://127.0.0.1:1", "key")
    assert env["LOOPS_BASE_URL"] == "http://127.0.0.1:1" and env["BASETEN_API_KEY"] == "key"
    assert "BASETEN_LOOPS_SCOPE" not in env and "PYTHONPATH" not in env


@pytest.mark.timeout(600)
def test_the_client_script_trains_and_times_through_the_loops_sdk(live_server) -> None:
    """The script with a small batch (4 x 32 tokens), 1 warm-up + 1 measured step and 3 small
    forwards against the live server: its JSON has every key the table reads, with finite
    positive times, and the run's telemetry gives the worker's time for both steps."""
    python = require_loops_python()
    model = live_server.model
    vocab = int(json.loads((Path(model.source) / "config.json").read_text())["vocab_size"])
    rows = np.random.default_rng(0).integers(0, vocab, size=(4, 33)).tolist()
    out = run_client(
        python,
        base_url=live_server.base_url,
        api_key=live_server.api_key,
        model=model.name,
        rows=rows,
        small=rows[0][:9],
        rank=8,
        lr=1e-4,
        steps=1,
        warmup=1,
        rounds=3,
        small_warmup=1,
        timeout_s=300,
    )
    try:
        assert out["sdk"].startswith("baseten-loops ")
        assert len(out["warmup_step_times"]) == 1 and len(out["step_times"]) == 1
        assert len(out["small_op_times"]) == 3
        assert out["tokens"] == 4 * 32
        assert len(out["losses"]) == 2 and all(math.isfinite(x) and x > 0 for x in out["losses"])
        assert out["first_step_s"] >= out["ready_s"] > 0
        worker = worker_step_times(live_server.base_url, live_server.api_key, out["run_id"], 2)
        assert len(worker) == 2 and all(math.isfinite(x) and x > 0 for x in worker)
        # the worker's share of a measured step cannot exceed the step the client timed
        assert worker[-1] < out["step_times"][0]
    finally:  # the Loops SDK has no call that ends a run: end it so its worker stops
        httpx.post(
            f"{live_server.base_url}/v1/loops/runs/{out['run_id']}/deactivate",
            headers={"Authorization": f"Bearer {live_server.api_key}"},
            timeout=30,
        )
