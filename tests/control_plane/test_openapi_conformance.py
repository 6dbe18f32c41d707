"""The served OpenAPI tells the truth: schemathesis (pinned, tests extra) runs its coverage,
fuzzing and stateful phases with every default check over ``/docs/openapi.json`` of a real
server (uvicorn on a port, real Postgres and Redis), authenticated with a real API key.

No controller runs, so nothing ever starts a worker: runs and samplers are created and stay
DEPLOYING, and every operation that needs a live trainer or sampler still gets its documented
answer (the trainer's health and a sampler's data plane answer 503 "not ready", which the
Loops SDK retries: that 503 is allowed as "not a server error" for those operations only).

The run is bounded (a fixed seed, a fixed number of examples per operation) and must find no
server error, no undocumented status, no answer its schema rejects (body, content type,
headers) and no wrong ``Allow``. Schemathesis' data-acceptance checks run too; the requests
a schema cannot describe (an id that does not exist, "one of a or b") are counted, not failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.control_plane.conftest import TEST_MODEL, Tenant, make_tenant
from tests.control_plane.seed import add_checkpoint
from tests.infra.api_server import ApiServer

REPO = Path(__file__).resolve().parents[2]
SEED = 20261206
MAX_EXAMPLES = 30
# failures that make the served schema a lie (schemathesis' codes)
MUST_NOT_HAPPEN = {
    "ST101": "server error",
    "ST103": "undocumented status code",
    "ST104": "missing Content-Type",
    "ST105": "undocumented Content-Type",
    "ST106": "malformed Content-Type",
    "ST107": "missing documented header",
    "ST108": "response violates its schema",
    "ST204": "wrong answer to an undeclared method",
    "ST205": "wrong Allow header",
}
# the operations whose 503 is the protocol's "not ready yet" (no worker runs here)
NOT_READY_503 = r"/trainer/health$|/sync/(sample|v1/completions|v1/chat/completions)$|^/readyz$"

CONFIG = f"""
seed = {SEED}
hooks = "tests.control_plane.schemathesis_hooks"
# Hypothesis' "too many examples filtered out" is about generating data, not about the server:
# a {{kind}}/{{name}} path parameter (the Tinker checkpoint routes) makes schemathesis drop many of
# its generated values, and which operation crosses the limit moves with unrelated schema
# changes (a new optional body field on the Loops create routes tipped a checkpoint DELETE over).
# The operation is still run with the values that can be sent.
suppress-health-check = ["filter_too_much"]
# every example runs: an operation's first failure (a data-acceptance one) does not end its testing
continue-on-failure = true

[cache]
enabled = false  # no crash replays from an earlier run: the same seed gives the same run

[generation]
max-examples = {MAX_EXAMPLES}
database = "none"

[[operations]]
include-path-regex = "{NOT_READY_503}"

[operations.checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


@pytest.fixture
def api_server(start_api_server: Callable[..., ApiServer]) -> ApiServer:
    # short long-polls: a pending future or operation answers "not yet" within a second
    return start_api_server(future_poll_timeout_seconds=1.0, wake_timeout_seconds=1.0)


async def seed(server: ApiServer, tenant: Tenant) -> dict[str, str]:
    """Real resources for the generated requests to name (tests/control_plane/schemathesis_hooks.py)."""
    rt = server.runtime
    async with httpx.AsyncClient(base_url=server.base_url, headers=tenant.headers, timeout=30) as c:

        async def ok(method: str, url: str, **kw: Any) -> dict[str, Any]:
            r = await c.request(method, url, **kw)
            assert r.status_code < 300, (url, r.text)
            doc: dict[str, Any] = r.json()
            return doc

        sid = (await ok("POST", "/v1/loops/sessions", json={}))["session"]["id"]
        run = (await ok("POST", "/v1/loops/runs", json={"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8}))[
            "run"
        ]
        weights = await add_checkpoint(rt, tenant, run["id"], "ckpt-1", kind="weights")
        snapshot = await add_checkpoint(rt, tenant, run["id"], "snap-1")
        await ok(
            "POST",
            f"{run['base_url']}/init_trainer_server",
            headers={"X-Run-Id": run["id"], "Idempotency-Key": "op-1"},
            json={"seq_id": 1, "lora_rank": 8},
        )
        body = {"session_id": sid, "model_seq_id": 0, "base_model": TEST_MODEL, "lora_config": {"rank": 8}}
        future = await ok("POST", "/api/v1/create_model", json=body)
        body = {"session_id": sid, "sampling_session_seq_id": 0, "base_model": TEST_MODEL}
        sampling = await ok("POST", "/api/v1/create_sampling_session", json=body)
    return {
        "session_id": sid,
        "run_id": run["id"],
        "sampler_id": run["sampler"]["id"],
        "deployment_id": run["deployment_id"],
        "checkpoint_id": weights.id,
        "tinker_checkpoint_id": f"weights/{weights.name}",
        "weights_path": f"tinker://{run['id']}/weights/{weights.name}",
        "sampler_path": f"bt://loops:{run['id']}/sampler_weights/{snapshot.name}",
        "base_model": TEST_MODEL,
        "operation_id": "op-1",
        "model_id": future["model_id"],
        "request_id": future["request_id"],
        "sampling_session_id": sampling["sampling_session_id"],
        "token": rt.download_url(f"{weights.storage_prefix}/adapter_config.json").rsplit("/", 1)[-1],
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schemathesis_finds_the_schema_truthful(api_server: ApiServer, tmp_path: Path) -> None:
    tenant = api_server.call(make_tenant(api_server.runtime, "conformance"))
    ids = api_server.call(seed(api_server, tenant))
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{api_server.base_url}/docs/openapi.json",
        "--header",
        f"Authorization: Bearer {tenant.key}",
        "--phases",
        "coverage,fuzzing,stateful",
        "--workers",
        "1",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    started = time.monotonic()
    env = {**os.environ, "OPENLOOPS_CONFORMANCE_IDS": json.dumps(ids)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540, check=False)
    elapsed = time.monotonic() - started
    (tmp_path / "schemathesis.log").write_text(proc.stdout + proc.stderr)
    assert report.exists(), proc.stdout[-5000:] + proc.stderr[-5000:]
    doc = json.loads(report.read_text())
    failures = {f["code"]: f for f in doc["failures"]}
    summary = {
        "seconds": round(elapsed, 1),
        "operations": doc["operations"],
        "cases": doc["test_cases"]["generated"],
        "failures": {code: (f["title"], f["count"]) for code, f in failures.items()},
        "errors": doc["errors"],
    }
    print(json.dumps(summary, indent=1))
    assert doc["complete"], summary
    assert doc["operations"]["tested"] == doc["operations"]["total"] and doc["operations"]["errored"] == 0, summary
    assert not doc["errors"], summary
    lies = {code: failures[code]["operations"] for code in MUST_NOT_HAPPEN if code in failures}
    assert not lies, (lies, proc.stdout[-20000:])
