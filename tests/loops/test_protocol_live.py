"""The Loops trainer protocol against a real worker, as raw HTTP (what the SDK sends, with the
control a client library hides): an op retried with the same Idempotency-Key after a lost
response is applied once, and a poll from a new connection (a client that reconnected) gets
the result; a forward_backward the SDK split into contiguous ops (sent concurrently, so they
may arrive out of order) is the same as one op."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.timeout(600)


def _client(live_server, run_id: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Api-Key {live_server.api_key}", "X-Baseten-Accept-Error": "1"}
    if run_id:
        headers["X-Run-Id"] = run_id
    return httpx.Client(base_url=live_server.base_url, headers=headers, timeout=60, trust_env=False)


def _result(c: httpx.Client, base: str, op_id: str, deadline_s: float = 120) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        r = c.get(f"{base}/operations/{op_id}", timeout=40)
        if r.status_code == 408:
            continue
        assert r.status_code == 200, r.text
        return r.json()
    raise TimeoutError(op_id)


def test_a_retried_op_is_applied_once_and_a_reconnected_client_gets_its_result(live_server) -> None:
    with _client(live_server) as c:
        sid = c.post("/v1/loops/sessions").json()["session"]["id"]
        run = c.post(
            "/v1/loops/trainers", json={"session_id": sid, "base_model": live_server.model.name, "lora_rank": 4}
        ).json()["run"]
    base = run["base_url"].removeprefix(live_server.base_url)
    with _client(live_server, run["id"]) as c:
        deadline = time.monotonic() + 180
        while c.get(f"{base}/health", params={"base_model": live_server.model.name}).status_code != 200:
            assert time.monotonic() < deadline, "the trainer never became ready"
            time.sleep(0.2)
        init = c.post(
            f"{base}/init_trainer_server",
            json={"lora_rank": 4, "seq_id": 1, "run_id": run["id"]},
            headers={"Idempotency-Key": "init-1"},
        )
        assert init.status_code == 202, init.text
        assert _result(c, base, "init-1") == {"status": "done", "result": {"step": 0, "lora_rank": 4}}
        datum = {
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": [11, 12, 13, 14, 15]}]},
            "loss_fn_inputs": {"target_tokens": {"data": [12, 13, 14, 15, 16], "dtype": "int64", "shape": [5]}},
        }
        fb = {"data": [datum], "loss_fn": "cross_entropy", "seq_id": 2, "run_id": run["id"]}
        step = {"adam_params": {"learning_rate": 1e-2, "grad_clip_norm": 1.0}, "seq_id": 3, "run_id": run["id"]}
        key = uuid.uuid4().hex
        for _ in range(3):  # the first response "lost": the client retries with the same key
            assert c.post(f"{base}/forward_backward", json=fb, headers={"Idempotency-Key": "fb-1"}).status_code == 202
            r = c.post(f"{base}/optim_step", json=step, headers={"Idempotency-Key": key})
            assert r.status_code == 202 and r.json()["operation_id"] == key
    # a new connection (the client restarted): the op's result is there, once
    with _client(live_server, run["id"]) as fresh:
        done = _result(fresh, base, key)
        assert done["status"] == "done" and done["result"]["metrics"]["grad_norm:mean"] > 0
        assert _result(fresh, base, "fb-1")["result"]["metrics"]["num_tokens"] == 5
        assert fresh.get(f"{base}/policy_version").json()["policy_version"] == 1  # one optim_step, not three


def _ready_run(live_server, lora_rank: int = 4) -> tuple[dict, str]:
    with _client(live_server) as c:
        sid = c.post("/v1/loops/sessions").json()["session"]["id"]
        run = c.post(
            "/v1/loops/trainers",
            json={"session_id": sid, "base_model": live_server.model.name, "lora_rank": lora_rank, "seed": 1},
        ).json()["run"]
    base = run["base_url"].removeprefix(live_server.base_url)
    with _client(live_server, run["id"]) as c:
        deadline = time.monotonic() + 180
        while c.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline, "the trainer never became ready"
            time.sleep(0.2)
        r = c.post(
            f"{base}/init_trainer_server",
            json={"lora_rank": lora_rank, "seq_id": 1},
            headers={"Idempotency-Key": "init"},
        )
        assert r.status_code == 202 and _result(c, base, "init")["status"] == "done"
    return run, base


def test_a_split_forward_backward_is_the_same_as_one(live_server) -> None:
    datums = [
        {
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": [20 + i, 21 + i, 22 + i, 23 + i]}]},
            "loss_fn_inputs": {
                "target_tokens": {"data": [-100, 22 + i, 23 + i, 24 + i], "dtype": "int64", "shape": [4]}
            },
        }
        for i in range(4)
    ]
    step = {"adam_params": {"learning_rate": 1e-2, "grad_clip_norm": 1.0}}
    after = []
    for split in (False, True):
        run, base = _ready_run(live_server)
        with _client(live_server, run["id"]) as c:
            if split:  # chunks with seq ids 2 and 3, the second one sent first
                b = c.post(
                    f"{base}/forward_backward",
                    json={"data": datums[2:], "seq_id": 3},
                    headers={"Idempotency-Key": "c2"},
                )
                a = c.post(
                    f"{base}/forward_backward",
                    json={"data": datums[:2], "seq_id": 2},
                    headers={"Idempotency-Key": "c1"},
                )
                assert a.status_code == b.status_code == 202
                nxt = 4
            else:
                assert (
                    c.post(
                        f"{base}/forward_backward",
                        json={"data": datums, "seq_id": 2},
                        headers={"Idempotency-Key": "c1"},
                    ).status_code
                    == 202
                )
                nxt = 3
            assert (
                c.post(f"{base}/optim_step", json={**step, "seq_id": nxt}, headers={"Idempotency-Key": "s"}).status_code
                == 202
            )
            assert _result(c, base, "s")["status"] == "done"
            r = c.post(f"{base}/forward", json={"data": datums, "seq_id": nxt + 1}, headers={"Idempotency-Key": "f"})
            assert r.status_code == 202
            after.append(_result(c, base, "f")["result"]["loss"])
    # gradients accumulate across the chunks and are normalized at the step: the same update
    assert after[1] == pytest.approx(after[0], rel=1e-5)
