"""Sampling through the live control plane: the controller runs the shared vLLM sampler, the
unmodified tinker SDK samples through /api/v1, Loops samplers report observed statuses and
their base_url serves OpenAI-compatible completions."""

from __future__ import annotations

import math
import os
import signal
import time

import httpx
import numpy as np
import pytest
import tinker
from sqlalchemy import select

from control_plane.db.models import Sampler, StatusHistory
from control_plane.sampling.dispatcher import dispatcher_for
from tests.control_plane.conftest import make_tenant
from tests.infra.vllm_server import VLLMServer
from tests.sampler.live import LiveStack, wait_status

PROMPT = [17, 240, 31, 99, 512, 7, 1200, 64, 301, 88, 45, 1999]


@pytest.fixture(scope="module")
def service(live_stack: LiveStack, vllm_server: VLLMServer) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=live_stack.base_url, api_key=live_stack.api_key)


@pytest.fixture(scope="module")
def base_sampler(service: tinker.ServiceClient, live_stack: LiveStack) -> tinker.SamplingClient:
    return service.create_sampling_client(base_model=live_stack.base_model).result()


@pytest.fixture(scope="module")
def tokenizer(vllm_server: VLLMServer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vllm_server.model_dir))


def first_sampler_id(stack: LiveStack) -> str:
    async def q() -> str:
        async with stack.runtime.db.session() as s:
            return (
                await s.execute(
                    select(Sampler.id)
                    .where(Sampler.base_model == stack.base_model)
                    .order_by(Sampler.created_at, Sampler.id)
                    .limit(1)
                )
            ).scalar_one()

    return stack.call(q())


def history(stack: LiveStack, sampler_id: str) -> list[tuple[str | None, str, str | None]]:
    async def q() -> list[tuple[str | None, str, str | None]]:
        async with stack.runtime.db.session() as s:
            rows = (
                await s.execute(
                    select(StatusHistory)
                    .where(StatusHistory.resource_id == sampler_id)
                    .order_by(StatusHistory.created_at, StatusHistory.id)
                )
            ).scalars()
            return [(r.from_status, r.to_status, r.reason) for r in rows]

    return stack.call(q())


def ints(model_input_tokens: list[int]) -> tinker.ModelInput:
    return tinker.ModelInput.from_ints(model_input_tokens)


def test_loops_sampler_statuses_follow_the_server(live_stack: LiveStack, vllm_server: VLLMServer):
    sid = vllm_server.extra["keepalive_sampler_id"]
    steps = [to for _, to, _ in history(live_stack, sid)]
    assert steps[0] == "DEPLOYING" and steps[-1] == "ACTIVE"
    # the sampler row whose creation started the shared server (this one when the sampler tests
    # run alone; an earlier test's when the whole suite runs) went through LOADING_MODEL while
    # vLLM loaded; rows created while it already served go straight to ACTIVE
    first = [to for _, to, _ in history(live_stack, first_sampler_id(live_stack))]
    assert first[0] == "DEPLOYING" and "LOADING_MODEL" in first and "ACTIVE" in first
    assert first.index("LOADING_MODEL") < first.index("ACTIVE")
    # a second sampler of the same base model joins the running server: no new workload
    with live_stack.http() as c:
        sess = c.post("/v1/loops/sessions", json={}).json()["session"]["id"]
        other = c.post("/v1/loops/samplers", json={"session_id": sess, "base_model": live_stack.base_model}).json()
    smp = wait_status(live_stack, other["sampler"]["id"], {"ACTIVE"})
    workloads = live_stack.call(live_stack.runtime.backend.list_workloads())  # type: ignore[union-attr]
    assert [w for w, role in workloads if role.value == "sampler"] == [live_stack.sampler_workload]
    assert smp["base_url"].endswith(f"/v1/loops/samplers/{smp['id']}/sync")


def test_loops_base_url_serves_openai_completions(live_stack: LiveStack, vllm_server: VLLMServer, tokenizer):
    sid = vllm_server.extra["keepalive_sampler_id"]
    with live_stack.http() as c:
        base = c.get(f"/v1/loops/samplers/{sid}").json()["sampler"]["base_url"]
        r = c.post(
            f"{base}/v1/completions", json={"model": "anything", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "anything" and out["usage"]["completion_tokens"] == 5 and out["choices"][0]["text"]
        r = c.post(
            f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        assert c.post(f"{base}/v1/completions", json={"prompt": "x", "stream": True}).status_code == 400
    # no key: 401; another org's key: 404
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "x"}).status_code == 401
    other = live_stack.call(make_tenant(live_stack.runtime, "other-org"))
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, headers={"X-API-Key": other.key})
    assert r.status_code == 404


def test_sdk_sample_shapes_and_logprobs(base_sampler: tinker.SamplingClient):
    params = tinker.SamplingParams(max_tokens=7, seed=11, temperature=1.0)
    resp = base_sampler.sample(prompt=ints(PROMPT), num_samples=3, sampling_params=params).result()
    assert len(resp.sequences) == 3
    ids = {s.sequence_id for s in resp.sequences}
    assert len(ids) == 3
    for seq in resp.sequences:
        assert len(seq.tokens) == 7 and seq.stop_reason == "length"
        assert seq.logprobs is not None and len(seq.logprobs) == 7 and all(lp <= 0 for lp in seq.logprobs)


def test_same_seed_same_sample(base_sampler: tinker.SamplingClient):
    params = tinker.SamplingParams(max_tokens=12, seed=1234, temperature=1.0)
    a = base_sampler.sample(prompt=ints(PROMPT), num_samples=2, sampling_params=params).result()
    b = base_sampler.sample(prompt=ints(PROMPT), num_samples=2, sampling_params=params).result()
    c = base_sampler.sample(
        prompt=ints(PROMPT),
        num_samples=2,
        sampling_params=tinker.SamplingParams(max_tokens=12, seed=99, temperature=1.0),
    ).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]


def test_stop_tokens_and_strings(base_sampler: tinker.SamplingClient, tokenizer):
    free = base_sampler.sample(
        prompt=ints(PROMPT),
        num_samples=1,
        sampling_params=tinker.SamplingParams(max_tokens=16, seed=5, temperature=0.0),
    ).result()
    toks = free.sequences[0].tokens
    assert len(toks) >= 4
    stop_tok = toks[3]
    first = toks.index(stop_tok)
    r = base_sampler.sample(
        prompt=ints(PROMPT),
        num_samples=1,
        sampling_params=tinker.SamplingParams(max_tokens=16, seed=5, temperature=0.0, stop=[stop_tok]),
    ).result()
    assert r.sequences[0].tokens == toks[: first + 1] and r.sequences[0].stop_reason == "stop"
    text = tokenizer.decode(toks)
    stop_str = tokenizer.decode(toks[2:4]).strip() or tokenizer.decode(toks[3:4])
    assert stop_str and stop_str in text
    r = base_sampler.sample(
        prompt=ints(PROMPT),
        num_samples=1,
        sampling_params=tinker.SamplingParams(max_tokens=16, seed=5, temperature=0.0, stop=[stop_str]),
    ).result()
    seq = r.sequences[0]
    assert seq.stop_reason == "stop"
    out = tokenizer.decode(seq.tokens)
    assert out.endswith(stop_str) or stop_str in out
    assert seq.tokens == toks[: len(seq.tokens)] and len(seq.tokens) < len(toks)


def test_prompt_logprobs_and_compute_logprobs(base_sampler: tinker.SamplingClient):
    lps = base_sampler.compute_logprobs(ints(PROMPT)).result()
    assert len(lps) == len(PROMPT) and lps[0] is None
    assert all(isinstance(x, float) and x <= 0 and math.isfinite(x) for x in lps[1:])
    r = base_sampler.sample(
        prompt=ints(PROMPT),
        num_samples=1,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
        sampling_params=tinker.SamplingParams(max_tokens=1, seed=1),
    ).result()
    np.testing.assert_allclose(r.prompt_logprobs[1:], lps[1:], atol=1e-5)
    assert r.topk_prompt_logprobs[0] is None and all(len(row) == 3 for row in r.topk_prompt_logprobs[1:])


def test_bad_requests_are_rejected_before_a_future(live_stack: LiveStack, base_sampler: tinker.SamplingClient):
    sid = base_sampler._sampling_session_id
    body = {
        "sampling_session_id": sid,
        "seq_id": 0,
        "num_samples": 1,
        "prompt": {"chunks": []},
        "sampling_params": {"max_tokens": 2},
    }
    with live_stack.http() as c:
        r = c.post("/api/v1/asample", json=body)
        assert r.status_code == 400 and "prompt" in r.json()["detail"]
        body["prompt"] = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
        r = c.post("/api/v1/asample", json={**body, "prompt_alt_tokens_k": 2})
        assert r.status_code == 400 and "prompt_alt_tokens_k" in r.json()["detail"]
        r = c.post("/api/v1/asample", json={**body, "record_stability_info": True})
        assert r.status_code == 400
        r = c.post("/api/v1/asample", json={**body, "sampling_session_id": "nope:sample:0"})
        assert r.status_code == 404
        r = c.post(
            "/api/v1/create_sampling_session",
            json={
                "session_id": sid.split(":")[0],
                "sampling_session_seq_id": 99,
                "model_path": "tinker://x:train:0/sampler_weights/none",
            },
        )
        assert r.status_code == 404
        r = c.post(
            "/api/v1/create_sampling_session",
            json={"session_id": sid.split(":")[0], "sampling_session_seq_id": 98, "model_path": "tinker://bad"},
        )
        assert r.status_code == 400
        r = c.get(f"/api/v1/samplers/{sid}")
        assert r.json() == {"sampler_id": sid, "base_model": live_stack.base_model, "model_path": None}


def test_saturated_server_answers_429(live_stack: LiveStack, base_sampler: tinker.SamplingClient):
    d = dispatcher_for(live_stack.runtime)
    sid = base_sampler._sampling_session_id
    body = {
        "sampling_session_id": sid,
        "seq_id": 0,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
        "sampling_params": {"max_tokens": 2},
    }
    saved = d.max_in_flight
    d.max_in_flight = 0
    try:
        with live_stack.http() as c:
            r = c.post("/api/v1/asample", json=body)
    finally:
        d.max_in_flight = saved
    assert r.status_code == 429 and r.json()["code"] == "sampler_busy"


def test_deleted_checkpoint_adapter_is_unloaded(live_stack: LiveStack, vllm_server: VLLMServer):
    from control_plane.sampling import VLLMClient
    from tests.infra.vllm_server import write_test_adapter

    prefix = write_test_adapter(vllm_server, None, "checkpoints/org-x/run-9:train:0/sampler_weights/gone-1", seed=7)

    async def load_then_unload() -> tuple[bool, bool, bool]:
        async with VLLMClient(vllm_server.base_url) as c:
            body = {
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
                "sampling_params": {"max_tokens": 2, "temperature": 0.0},
            }
            await c.sample(body, model=prefix)
            loaded = prefix in {m.id for m in await c.list_models()}
            d = dispatcher_for(live_stack.runtime)
            dropped = await d.unload_deleted_adapter(live_stack.base_model, prefix)
            still = prefix in {m.id for m in await c.list_models()}
            return loaded, dropped, still

    assert live_stack.call(load_then_unload()) == (True, True, False)


@pytest.mark.kills_sampler
def test_killed_sampler_fails_rows_and_pending_futures(live_stack: LiveStack, vllm_server: VLLMServer, base_sampler):
    sid = base_sampler._sampling_session_id
    body = {
        "sampling_session_id": sid,
        "seq_id": 0,
        "num_samples": 8,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {"max_tokens": 400, "temperature": 1.0, "stop": []},
    }
    with live_stack.http() as c:
        rids = [c.post("/api/v1/asample", json=body).json()["request_id"] for _ in range(4)]
        pid = live_stack.sampler_pid()
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        for rid in rids:
            r = c.post("/api/v1/retrieve_future", json={"request_id": rid, "allow_metadata_only": True})
            while r.json().get("type") == "try_again":
                r = c.post("/api/v1/retrieve_future", json={"request_id": rid, "allow_metadata_only": True})
            assert r.json()["category"] == "server" and r.json()["error"]
    smp = wait_status(live_stack, vllm_server.extra["keepalive_sampler_id"], {"FAILED"})
    assert "SIGKILL" in smp["status"]["reason"]
    with live_stack.http() as c:
        tinker_row = c.get(f"/v1/loops/samplers/{sid}").json()["sampler"]
    assert tinker_row["status"]["name"] == "FAILED"
    # the dead server's workload is gone; nothing live keeps a sampler for this model
    deadline = time.monotonic() + 30
    while live_stack.sampler_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_stack.sampler_pid() is None
