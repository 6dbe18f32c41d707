"""Tinker asample <-> vLLM completions translation, without a server."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tinker.proto.response_conv import deserialize_sample_response

from control_plane.sampling import (
    InvalidSampleRequest,
    SamplerFailed,
    UnsupportedSampleFeature,
    build_completion_body,
    completion_to_sample_response,
    parse_sample_request,
)


def req(**kw):
    body = {
        "num_samples": 1,
        "prompt": {"chunks": [{"tokens": [1, 5, 9], "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 6, "seed": 123, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "sampling_session_id": "s:sample:0",
        "seq_id": 0,
        "prompt_logprobs": False,
        "topk_prompt_logprobs": 0,
        "topk_sample_logprobs": 0,
        "prompt_alt_tokens_k": 0,
        "record_stability_info": False,
        "type": "sample",
    }
    sp = kw.pop("sampling_params", None)
    if sp is not None:
        body["sampling_params"] = {**body["sampling_params"], **sp}
    body.update(kw)
    return body


def test_chunks_are_concatenated_and_defaults():
    spec = parse_sample_request(
        req(
            prompt={
                "chunks": [
                    {"tokens": [1, 2], "type": "encoded_text"},
                    {"tokens": [3]},
                    {"tokens": [4, 5], "type": "encoded_text"},
                ]
            }
        )
    )
    assert spec.prompt_tokens == (1, 2, 3, 4, 5)
    body = build_completion_body(spec, model="m")
    assert body["prompt"] == [1, 2, 3, 4, 5]
    assert body["model"] == "m" and body["n"] == 1 and body["max_tokens"] == 6 and body["seed"] == 123
    assert body["top_k"] == 0  # -1 -> vLLM's "disabled"
    assert body["logprobs"] == 0 and body["return_token_ids"] and body["return_tokens_as_token_ids"]
    assert body["include_stop_str_in_output"] is True
    assert "stop" not in body and "stop_token_ids" not in body and "ignore_eos" not in body
    assert "prompt_logprobs" not in body


@pytest.mark.parametrize(
    "chunk",
    [
        {"data": "aGVsbG8=", "format": "png", "type": "image"},
        {"format": "png", "location": "s3://x", "type": "image_asset_pointer"},
    ],
)
def test_image_chunks_rejected(chunk):
    with pytest.raises(UnsupportedSampleFeature, match="text-only"):
        parse_sample_request(req(prompt={"chunks": [{"tokens": [1], "type": "encoded_text"}, chunk]}))


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"prompt_alt_tokens_k": 2}, "prompt_alt_tokens_k"),
        ({"prompt_logprobs_last_n": 3, "prompt_logprobs": True}, "prompt_logprobs_last_n"),
        ({"target_prompt_logprobs": {"data": [1], "dtype": "int64", "shape": [1, 1]}}, "target_prompt_logprobs"),
    ],
)
def test_unimplemented_features_rejected(extra, match):
    with pytest.raises(UnsupportedSampleFeature, match=match):
        parse_sample_request(req(**extra))


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": {"chunks": []}},
        {"prompt": {"chunks": [{"tokens": [-1]}]}},
        {"prompt": {"chunks": [{"tokens": ["a"]}]}},
        {"prompt": [1, 2]},
        {"num_samples": 0},
        {"sampling_params": {"temperature": -1}},
        {"sampling_params": {"top_p": 0}},
        {"sampling_params": {"top_k": -2}},
        {"sampling_params": {"max_tokens": -1}},
        {"sampling_params": {"stop": ["a", 1]}},
        {"sampling_params": {"stop": [""]}},
        {"sampling_params": {"stop": 5}},
        {"prompt_logprobs": "yes"},
    ],
)
def test_invalid_requests(bad):
    with pytest.raises(InvalidSampleRequest):
        parse_sample_request(req(**bad))


def test_stop_variants():
    def body(stop):
        return build_completion_body(parse_sample_request(req(sampling_params={"stop": stop})), model="m")

    b = body(None)
    assert "stop" not in b and "stop_token_ids" not in b and not b.get("ignore_eos")
    assert body("\n\nUser:")["stop"] == ["\n\nUser:"]
    assert body(["a", "bc"])["stop"] == ["a", "bc"]
    b = body([2, 7])
    assert b["stop_token_ids"] == [2, 7] and "stop" not in b and not b.get("ignore_eos")
    b = body([])
    assert b["ignore_eos"] is True and "stop" not in b and "stop_token_ids" not in b


def test_sampling_params_mapping():
    spec = parse_sample_request(
        req(num_samples=3, sampling_params={"seed": 2**64 - 1, "top_k": 5, "top_p": 0.5, "temperature": 0.7})
    )
    b = build_completion_body(spec, model="m")
    assert b["n"] == 3 and b["top_k"] == 5 and b["top_p"] == 0.5 and b["temperature"] == 0.7
    assert 0 <= b["seed"] <= 2**63 - 1  # Tinker's uint64 seed folded into vLLM's int64
    spec = parse_sample_request(req(sampling_params={"max_tokens": None, "seed": None}))
    b = build_completion_body(spec, model="m", max_model_len=100)
    assert b["max_tokens"] == 97 and "seed" not in b
    spec = parse_sample_request(req(prompt_logprobs=True, topk_prompt_logprobs=0))
    assert build_completion_body(spec, model="m")["prompt_logprobs"] == 0
    spec = parse_sample_request(req(prompt_logprobs=False, topk_prompt_logprobs=4, topk_sample_logprobs=3))
    b = build_completion_body(spec, model="m")
    assert b["prompt_logprobs"] == 4 and b["logprobs"] == 3


def _choice(index, toks, lps, finish, top=None, prompt_lps=None):
    return {
        "index": index,
        "text": "",
        "token_ids": toks,
        "finish_reason": finish,
        "logprobs": {
            "tokens": [f"token_id:{t}" for t in toks],
            "token_logprobs": lps,
            "top_logprobs": top or [{f"token_id:{t}": lp} for t, lp in zip(toks, lps)],
        },
        "prompt_logprobs": prompt_lps,
    }


def test_response_decodes_with_the_sdk():
    spec = parse_sample_request(
        req(num_samples=2, prompt_logprobs=True, topk_prompt_logprobs=2, topk_sample_logprobs=2)
    )
    prompt_lps = [
        None,
        {"5": {"logprob": -3.0, "rank": 7}, "11": {"logprob": -0.5, "rank": 1}, "12": {"logprob": -1.0, "rank": 2}},
        {"9": {"logprob": -0.2, "rank": 1}, "13": {"logprob": -2.0, "rank": 2}},
    ]
    top0 = [
        {"token_id:4": -2.0, "token_id:8": -0.1, "token_id:3": -1.5},  # sampled (rank 3) listed first
        {"token_id:6": -0.3, "token_id:7": -1.2},  # sampled is the top-1: only k entries
    ]
    completion = {
        "choices": [
            _choice(1, [9, 2], [-0.7, -0.01], "stop", prompt_lps=prompt_lps),
            _choice(0, [4, 6], [-2.0, -0.3], "length", top=top0, prompt_lps=prompt_lps),
        ],
        "usage": {"prompt_tokens": 3},
    }
    out = deserialize_sample_response(completion_to_sample_response(spec, completion))
    s0, s1 = out.sequences
    assert s0.tokens == [4, 6] and s0.stop_reason == "length"
    assert s1.tokens == [9, 2] and s1.stop_reason == "stop"
    assert s0.tokens_np.dtype == np.int32 and s0.logprobs_np.dtype == np.float32
    np.testing.assert_allclose(s0.logprobs, [-2.0, -0.3], rtol=1e-6)
    assert s0.topk_logprobs[0] == [(8, pytest.approx(-0.1)), (3, pytest.approx(-1.5))]
    assert s0.topk_logprobs[1] == [(6, pytest.approx(-0.3)), (7, pytest.approx(-1.2))]
    assert s0.topk_logprobs_np.token_ids.shape == (2, 2)
    assert s1.topk_logprobs[1] == [(2, pytest.approx(-0.01))]  # one entry, rest is the empty slot
    assert s1.topk_logprobs_np.logprobs[1, 1] == -99999.0 and s1.topk_logprobs_np.token_ids[1, 1] == 0
    plp = out.prompt_logprobs
    assert plp[0] is None and plp[1:] == [pytest.approx(-3.0), pytest.approx(-0.2)]
    assert math.isnan(out.prompt_logprobs_np[0])
    tk = out.topk_prompt_logprobs
    assert tk[0] is None
    assert tk[1] == [(11, pytest.approx(-0.5)), (12, pytest.approx(-1.0))]
    assert tk[2] == [(9, pytest.approx(-0.2)), (13, pytest.approx(-2.0))]
    assert out.topk_prompt_logprobs_np.token_ids.shape == (3, 2)


def test_max_tokens_zero_returns_empty_sequences():
    spec = parse_sample_request(req(sampling_params={"max_tokens": 0}, prompt_logprobs=True))
    assert build_completion_body(spec, model="m")["max_tokens"] == 1
    completion = {
        "choices": [
            _choice(
                0,
                [7],
                [-1.0],
                "length",
                prompt_lps=[None, {"5": {"logprob": -1, "rank": 1}}, {"9": {"logprob": -2, "rank": 3}}],
            )
        ]
    }
    out = deserialize_sample_response(completion_to_sample_response(spec, completion))
    assert out.sequences[0].tokens == [] and out.sequences[0].stop_reason == "length"
    assert out.prompt_logprobs[1:] == [-1.0, -2.0]


def test_malformed_completion_is_a_sampler_failure():
    spec = parse_sample_request(req())
    with pytest.raises(SamplerFailed):
        completion_to_sample_response(spec, {"choices": []})
    with pytest.raises(SamplerFailed):
        completion_to_sample_response(spec, {"choices": [{"index": 0, "finish_reason": "stop"}]})
    bad = _choice(0, [1], [-1.0], "abort")
    with pytest.raises(SamplerFailed, match="abort"):
        completion_to_sample_response(spec, {"choices": [bad]})
    bad = _choice(0, [1], [-1.0], "stop")
    bad["logprobs"]["tokens"] = ["token_id:2"]
    with pytest.raises(SamplerFailed, match="disagree"):
        completion_to_sample_response(spec, {"choices": [bad]})


def test_greedy_with_many_samples_asks_once_and_repeats():
    spec = parse_sample_request(req(num_samples=3, sampling_params={"temperature": 0.0}))
    assert build_completion_body(spec, model="m")["n"] == 1
    out = deserialize_sample_response(
        completion_to_sample_response(spec, {"choices": [_choice(0, [4, 2], [-0.1, -0.2], "stop")]})
    )
    assert [s.tokens for s in out.sequences] == [[4, 2]] * 3
