"""Train -> serve -> use, end to end: the unmodified tinker SDK trains the tiny model and saves
two sampler checkpoints, both are deployed as one served model (its own vLLM server, started by
the live server's controller), the official ``openai`` client chats with each by name, plain and
streaming, the console's page of it charts its requests and its playground chats with it, the served model's logprobs agree with the trainer's (its verification), its metrics
count the requests, it scales to zero and a request wakes it, and after deactivation it is gone."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
import tinker
from sqlalchemy import update
from tinker import types

from control_plane.db.models import ServedModel
from tests.e2e.sft import TEXT, datum
from tests.infra.browser import sign_in
from tests.sampler.live import LiveStack

pytestmark = pytest.mark.timeout(900)


def wait_for(what: str, check: Any, timeout_s: float = 300.0, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def http(stack: LiveStack):
    with httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=120.0
    ) as c:
        yield c


@pytest.fixture(scope="module")
def two_checkpoints(stack: LiveStack, http: httpx.Client) -> list[str]:
    """Two sampler checkpoints of one run: after 2 and after 8 SFT steps."""
    service = tinker.ServiceClient(base_url=stack.base_url, api_key=stack.api_key)
    tc = service.create_lora_training_client(stack.base_model, rank=8, seed=0).result()
    tok = tc.get_tokenizer()
    paths = []
    for name, steps in (("early", 2), ("late", 6)):
        for _ in range(steps):
            tc.forward_backward([datum(tok, TEXT)], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=2e-2))
        paths.append(tc.save_weights_for_sampler(name).result().path)
    ids = []
    for path in paths:
        found = http.get("/v1/loops/checkpoints", params={"checkpoint_path": path}).json()["checkpoints"]
        ids.append(found[0]["id"])
    return ids


def served(http: httpx.Client, sm_id: str) -> dict:
    r = http.get(f"/v1/loops/served_models/{sm_id}")
    assert r.status_code == 200, r.text
    return r.json()["served_model"]


def test_train_deploy_chat_verify_meter_sleep_wake_deactivate(
    stack: LiveStack, http: httpx.Client, two_checkpoints, browser: Any, shots: Any
):
    r = http.post("/v1/loops/checkpoints/deploy", json={"checkpoint_ids": two_checkpoints, "model_name": "cats"})
    assert r.status_code == 200, r.text
    sm_id, base_url = r.json()["model_id"], r.json()["base_url"]
    sm = wait_for(
        "the served model to be ACTIVE", lambda: (x := served(http, sm_id))["status"]["name"] == "ACTIVE" and x
    )
    assert [c["model"] for c in sm["checkpoints"]] == ["early", "late"]

    client = openai.OpenAI(base_url=base_url, api_key=stack.api_key, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["early", "late", stack.base_model]

    # each checkpoint by name, plain: greedy completions differ between the two adapters
    outs = {}
    tokens = {"prompt_tokens": 0, "completion_tokens": 0}  # what vLLM reported, for usage

    def used(u: Any) -> None:
        tokens["prompt_tokens"] += u.prompt_tokens
        tokens["completion_tokens"] += u.completion_tokens

    for name in ("early", "late", stack.base_model):
        c = client.completions.create(model=name, prompt="the cat sat", max_tokens=8, temperature=0.0, logprobs=1)
        used(c.usage)
        assert c.model == name  # the client sees the name it asked for, never an adapter path
        assert c.choices[0].logprobs is not None and len(c.choices[0].logprobs.token_logprobs) == 8
        outs[name] = c.choices[0].text
    assert outs["late"] != outs[stack.base_model], outs
    chat = client.chat.completions.create(
        model="late", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0.0
    )
    assert chat.model == "late" and chat.choices[0].message.content is not None
    used(chat.usage)

    # streaming: the same text arrives in pieces, and the raw stream ends with data: [DONE]
    pieces = [
        ch.choices[0].text
        for ch in client.completions.create(
            model="late", prompt="the cat sat", max_tokens=8, temperature=0.0, stream=True
        )
        if ch.choices
    ]
    assert len(pieces) > 1 and "".join(pieces) == outs["late"]
    # a stream that asks for usage: its last chunk carries it, and the proxy counts it
    chunks = list(
        client.completions.create(
            model="early",
            prompt="the dog",
            max_tokens=5,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    used(chunks[-1].usage)
    with http.stream(
        "POST",
        f"{base_url}/chat/completions",
        json={"model": "early", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in resp.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
    assert '"model":"early"' in lines[0].replace(" ", "") and "sampler_weights" not in "".join(lines)

    # verified against the trainer: vLLM's prompt logprobs on each checkpoint's probe
    sm = wait_for("verification", lambda: (x := served(http, sm_id))["verification"] != "pending" and x, 120)
    print("verification:", sm["verification"], [(c["model"], c["max_abs_delta"]) for c in sm["checkpoints"]])
    assert sm["verification"] == "ok", sm
    assert all(c["max_abs_delta"] is not None and c["max_abs_delta"] < 1e-3 for c in sm["checkpoints"]), sm

    # metered: the requests above, by status class, with latency percentiles
    def volume() -> Any:
        m = http.post(f"/v1/loops/served_models/{sm_id}/metrics", json={}).json()["metrics"]
        return sum(p["value"] for p in m["inference_volume"]) >= 6 and m

    metrics = wait_for("the request metrics", volume, 60)
    assert sum(p["status_2xx"] for p in metrics["inference_volume_by_status"]) >= 6
    assert all(p["p50"] is not None and p["p50"] <= p["p99"] for p in metrics["response_time_stats"])

    # usage: the served model's requests and exactly the tokens vLLM reported for them (the two
    # streams that did not ask for usage count no tokens)
    def usage() -> Any:
        items = [i for i in http.get("/v1/loops/usage").json()["items"] if i.get("served_model_id") == sm_id]
        return len(items) == 1 and items[0]["served"]["requests"] >= 7 and items[0]

    item = wait_for("the served model's usage", usage, 60)
    assert {k: item["served"][k] for k in tokens} == tokens, (item, tokens)
    assert item["worker_seconds"] and item["name"] == "cats"

    # the console's page of it: its request charts, and the playground chats with a checkpoint
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    sign_in(page, stack.base_url, stack.api_key, f"/console/served-models/{sm_id}")
    page.locator('.chart[data-chart="inference_volume"] .legend span').first.wait_for(timeout=60_000)
    charted = json.loads(page.get_attribute('.chart[data-chart="inference_volume"] svg', "data-series") or "[]")
    assert sum(y for _, y in charted[0]["points"]) >= 6
    assert page.locator('.chart[data-chart="latency"] .legend span').count() == 3  # p50, p95, p99
    page.select_option("#pg-model", "late")
    page.fill("#pg-max-tokens", "6")
    page.fill("#pg-prompt", "hi")
    page.click("form.chat button[type=submit]")
    page.locator("#pg-log .msg.assistant").wait_for(timeout=60_000)
    assert page.locator("#pg-log .msg.assistant").inner_text().startswith("late: ")
    shots(page, "served-model")
    page.close()

    # idle -> scaled to zero; a request wakes it and is answered
    async def short_delay() -> None:
        async with stack.runtime.db.transaction() as s:
            await s.execute(update(ServedModel).where(ServedModel.id == sm_id).values(scale_down_delay_seconds=1))

    stack.call(short_delay())
    wait_for("scale to zero", lambda: served(http, sm_id)["status"]["name"] == "SCALED_TO_ZERO", 120)

    async def long_delay() -> None:
        async with stack.runtime.db.transaction() as s:
            await s.execute(update(ServedModel).where(ServedModel.id == sm_id).values(scale_down_delay_seconds=3600))

    stack.call(long_delay())
    woken = openai.OpenAI(base_url=base_url, api_key=stack.api_key, max_retries=0, timeout=300.0)
    c = woken.completions.create(model="late", prompt="the cat sat", max_tokens=8, temperature=0.0)
    assert c.choices[0].text == outs["late"]
    assert served(http, sm_id)["status"]["name"] == "ACTIVE"

    # deactivated: its server stops, and its API answers 410
    assert http.post(f"/v1/loops/served_models/{sm_id}/deactivate").status_code == 200
    wait_for("INACTIVE", lambda: served(http, sm_id)["status"]["name"] == "INACTIVE", 120)
    with pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model="late", prompt="x", max_tokens=1)
    assert exc.value.status_code == 410
