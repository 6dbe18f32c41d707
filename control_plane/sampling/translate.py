"""Tinker ``asample`` <-> vLLM ``/v1/completions`` translation (pure functions, no I/O).

1. :func:`parse_sample_request` validates the JSON body the SDK posts to ``/api/v1/asample``
   and returns a :class:`SampleSpec` (prompt chunks concatenated into one token list).
2. :func:`build_completion_body` turns it into one vLLM completions request: a token-id prompt,
   ``n`` samples, exact token ids back (``return_token_ids``; logprob keys as ``token_id:N``
   through ``return_tokens_as_token_ids``), a logprob for every sampled token, stop strings
   *included* in the output, stop token ids and EOS included as the last token.
3. :func:`build_sample_response` / :func:`completion_to_sample_response` turn vLLM's JSON answer
   into the protobuf ``SampleResponse`` the SDK decodes (``tinker.proto.response_conv``).

Stop semantics (Tinker ``SamplingParams.stop``): absent keeps EOS stopping; a string or a list
of strings adds stop strings; a list of ints adds stop tokens; ``[]`` disables every stop
including EOS (generation runs to ``max_tokens``). The sequence that ended on a stop carries the
stop token, or the token(s) that completed the stop string, as its last token(s) and nothing
after; ``stop_reason`` is ``"stop"``; hitting ``max_tokens`` gives ``"length"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from control_plane.sampling.errors import (
    InvalidSampleRequest,
    SamplerFailed,
    UnsupportedSampleFeature,
)
from data_plane.wire import tinker_wire_pb2 as pb

MASK_TOKEN_ID = 0
MASK_LOGPROB = -99999.0
MAX_NUM_SAMPLES = 1024
_INT64_MAX = 2**63 - 1
_TOKEN_PREFIX = "token_id:"


@dataclass(frozen=True, slots=True)
class SampleSpec:
    prompt_tokens: tuple[int, ...]
    num_samples: int = 1
    max_tokens: int | None = None
    seed: int | None = None
    temperature: float = 1.0
    top_k: int = -1  # -1: no limit
    top_p: float = 1.0
    stop: tuple[str, ...] | tuple[int, ...] | None = None  # None: absent (EOS only)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs or self.topk_prompt_logprobs > 0

    @property
    def vllm_n(self) -> int:
        """vLLM refuses n > 1 with greedy sampling; greedy samples are identical, so we ask
        for one and repeat it."""
        return 1 if self.temperature == 0.0 else self.num_samples


# --------------------------------------------------------------------------- request


def _int(v: Any, what: str, *, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise InvalidSampleRequest(f"{what} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise InvalidSampleRequest(f"{what} must be >= {lo}, got {v}")
    return v


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidSampleRequest(f"{what} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise InvalidSampleRequest(f"{what} must be finite, got {v!r}")
    return f


def _prompt_tokens(prompt: Any) -> tuple[int, ...]:
    if not isinstance(prompt, Mapping) or not isinstance(prompt.get("chunks"), list):
        raise InvalidSampleRequest("prompt must be an object with a 'chunks' list")
    tokens: list[int] = []
    for i, chunk in enumerate(prompt["chunks"]):
        if not isinstance(chunk, Mapping):
            raise InvalidSampleRequest(f"prompt.chunks[{i}] must be an object")
        kind = chunk.get("type", "encoded_text")
        if kind in ("image", "image_asset_pointer"):
            raise UnsupportedSampleFeature(
                f"prompt.chunks[{i}] is an {kind} chunk: this sampler serves text-only models"
            )
        if kind != "encoded_text":
            raise InvalidSampleRequest(f"prompt.chunks[{i}] has unsupported type {kind!r}")
        toks = chunk.get("tokens")
        if not isinstance(toks, list):
            raise InvalidSampleRequest(f"prompt.chunks[{i}].tokens must be a list of token ids")
        for t in toks:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t > 2**31 - 1:
                raise InvalidSampleRequest(f"prompt.chunks[{i}].tokens holds an invalid token id {t!r}")
        tokens.extend(toks)
    if not tokens:
        raise InvalidSampleRequest("prompt is empty")
    return tuple(tokens)


def _stop(v: Any) -> tuple[str, ...] | tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        if not v:
            raise InvalidSampleRequest("sampling_params.stop: stop strings must be non-empty")
        return (v,)
    if not isinstance(v, list):
        raise InvalidSampleRequest("sampling_params.stop must be a string, a list of strings or a list of ints")
    if all(isinstance(s, str) for s in v):
        if any(not s for s in v):
            raise InvalidSampleRequest("sampling_params.stop: stop strings must be non-empty")
        return tuple(v)
    if all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v):
        return tuple(v)
    raise InvalidSampleRequest("sampling_params.stop must be all strings or all non-negative token ids, not a mix")


def parse_sample_request(body: Mapping[str, Any]) -> SampleSpec:
    """Validate a Tinker ``asample`` JSON body; raise InvalidSampleRequest / UnsupportedSampleFeature."""
    if not isinstance(body, Mapping):
        raise InvalidSampleRequest("sample request must be a JSON object")
    if _int(body.get("prompt_alt_tokens_k") or 0, "prompt_alt_tokens_k", lo=0) > 0:
        raise UnsupportedSampleFeature("prompt_alt_tokens_k is not supported by this server")
    if body.get("prompt_logprobs_last_n") is not None:
        raise UnsupportedSampleFeature(
            "prompt_logprobs_last_n is not supported by this server; request prompt_logprobs for "
            "the whole prompt and slice it"
        )
    if body.get("target_prompt_logprobs") is not None:
        raise UnsupportedSampleFeature("target_prompt_logprobs is not supported by this server")
    prompt = _prompt_tokens(body.get("prompt"))
    num_samples = _int(body.get("num_samples", 1), "num_samples", lo=1)
    if num_samples > MAX_NUM_SAMPLES:
        raise InvalidSampleRequest(f"num_samples must be <= {MAX_NUM_SAMPLES}, got {num_samples}")
    sp = body.get("sampling_params") or {}
    if not isinstance(sp, Mapping):
        raise InvalidSampleRequest("sampling_params must be an object")
    max_tokens = sp.get("max_tokens")
    if max_tokens is not None:
        max_tokens = _int(max_tokens, "sampling_params.max_tokens", lo=0)
    seed = sp.get("seed")
    if seed is not None:
        seed = _int(seed, "sampling_params.seed") & _INT64_MAX  # Tinker seeds are uint64
    temperature = _float(sp.get("temperature", 1.0), "sampling_params.temperature")
    if temperature < 0:
        raise InvalidSampleRequest(f"sampling_params.temperature must be >= 0, got {temperature}")
    top_k = _int(sp.get("top_k", -1), "sampling_params.top_k", lo=-1)
    top_p = _float(sp.get("top_p", 1.0), "sampling_params.top_p")
    if not 0.0 < top_p <= 1.0:
        raise InvalidSampleRequest(f"sampling_params.top_p must be in (0, 1], got {top_p}")
    plp = body.get("prompt_logprobs")
    if plp is not None and not isinstance(plp, bool):
        raise InvalidSampleRequest("prompt_logprobs must be a boolean")
    return SampleSpec(
        prompt_tokens=prompt,
        num_samples=num_samples,
        max_tokens=max_tokens,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=_stop(sp.get("stop")),
        prompt_logprobs=bool(plp),
        topk_prompt_logprobs=_int(body.get("topk_prompt_logprobs") or 0, "topk_prompt_logprobs", lo=0),
        topk_sample_logprobs=_int(body.get("topk_sample_logprobs") or 0, "topk_sample_logprobs", lo=0),
    )


def build_completion_body(
    spec: SampleSpec,
    *,
    model: str,
    max_model_len: int | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The vLLM ``/v1/completions`` JSON for ``spec``, served by ``model`` (base name or LoRA name).

    ``max_model_len`` fills in ``max_tokens`` when the request left it out (the rest of the
    context window); without it vLLM's default (16) would apply.
    """
    n_prompt = len(spec.prompt_tokens)
    if spec.max_tokens is None:
        max_tokens = max(1, max_model_len - n_prompt) if max_model_len else None
    else:
        max_tokens = max(1, spec.max_tokens)  # 0: generate 1 and drop it (see build_sample_response)
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(spec.prompt_tokens),
        "n": spec.vllm_n,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "top_k": spec.top_k if spec.top_k > 0 else 0,  # vLLM: 0 disables top-k
        # Explicit neutral values so no generation_config.json default applies.
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        # Always a logprob per sampled token; plus top-k when asked.
        "logprobs": spec.topk_sample_logprobs,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,  # stop strings may name special tokens (e.g. "<|im_end|>")
        "spaces_between_special_tokens": False,
        "stream": False,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if spec.seed is not None:
        body["seed"] = spec.seed
    if spec.wants_prompt_logprobs:
        body["prompt_logprobs"] = spec.topk_prompt_logprobs
    if spec.stop is not None:
        if len(spec.stop) == 0:
            body["ignore_eos"] = True  # [] disables every stop, EOS included
        elif isinstance(spec.stop[0], str):
            body["stop"] = list(spec.stop)
        else:
            body["stop_token_ids"] = list(spec.stop)
    if request_id:
        body["request_id"] = request_id
    return body


# --------------------------------------------------------------------------- response


def _token_key(key: str) -> int:
    if key.startswith(_TOKEN_PREFIX):
        return int(key[len(_TOKEN_PREFIX) :])
    return int(key)


def _topk_rows(rows: Sequence[Sequence[tuple[int, float]] | None], k: int) -> pb.TopkLogprobs:
    ids = np.full((len(rows), k), MASK_TOKEN_ID, dtype="<i4")
    lps = np.full((len(rows), k), MASK_LOGPROB, dtype="<f4")
    for i, row in enumerate(rows):
        if not row:
            continue
        m = min(k, len(row))
        ids[i, :m] = [t for t, _ in row[:m]]
        lps[i, :m] = [lp for _, lp in row[:m]]
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=len(rows))


def _sample_topk(top: Any, k: int) -> list[tuple[int, float]] | None:
    """vLLM gives {sampled token, top-1..top-k} per position; keep the k most likely."""
    if not top:
        return None
    items = [(_token_key(key), float(lp)) for key, lp in top.items()]
    items.sort(key=lambda t: -t[1])  # stable: ties keep vLLM's (rank) order
    return items[:k]


def _prompt_topk(entry: Mapping[str, Any] | None, k: int) -> list[tuple[int, float]] | None:
    if not entry:
        return None
    items = [(int(tid), v.get("rank") or 0, float(v["logprob"])) for tid, v in entry.items()]
    items = [it for it in items if it[1] and it[1] <= k]
    items.sort(key=lambda t: (t[1], -t[2]))
    return [(tid, lp) for tid, _, lp in items[:k]]


def build_sample_response(spec: SampleSpec, completion: Mapping[str, Any]) -> pb.SampleResponse:
    """The protobuf ``SampleResponse`` for vLLM's completions JSON answer to ``spec``."""
    try:
        choices = sorted(completion["choices"], key=lambda c: c.get("index", 0))
    except (KeyError, TypeError) as e:
        raise SamplerFailed(f"malformed vLLM completion response: {e!r}") from e
    if len(choices) != spec.vllm_n:
        raise SamplerFailed(f"vLLM returned {len(choices)} choices for n={spec.vllm_n}")
    if spec.vllm_n != spec.num_samples:
        choices = choices * spec.num_samples
    resp = pb.SampleResponse()
    drop_all = spec.max_tokens == 0
    for ch in choices:
        tokens = ch.get("token_ids")
        lp = ch.get("logprobs") or {}
        token_lps = lp.get("token_logprobs")
        if tokens is None or token_lps is None or len(tokens) != len(token_lps):
            raise SamplerFailed("vLLM response lacks token ids or per-token logprobs")
        strs = lp.get("tokens") or []
        if len(strs) == len(tokens) and any(_token_key(s) != t for s, t in zip(strs, tokens, strict=True)):
            raise SamplerFailed("vLLM token ids disagree with its logprob tokens")
        finish = ch.get("finish_reason")
        if finish == "stop":
            reason = pb.STOP_REASON_STOP
        elif finish == "length":
            reason = pb.STOP_REASON_LENGTH
        else:
            raise SamplerFailed(f"vLLM ended a sample with finish_reason={finish!r}")
        top = lp.get("top_logprobs") or [None] * len(tokens)
        if drop_all:
            tokens, token_lps, top, reason = [], [], [], pb.STOP_REASON_LENGTH
        seq = resp.sequences.add()
        seq.stop_reason = reason
        seq.tokens = np.asarray(tokens, dtype="<i4").tobytes()
        seq.logprobs = np.asarray([float("nan") if v is None else v for v in token_lps], dtype="<f4").tobytes()
        if spec.topk_sample_logprobs > 0:
            k = spec.topk_sample_logprobs
            seq.topk_sampled_logprobs.CopyFrom(_topk_rows([_sample_topk(t, k) for t in top], k))
    if spec.wants_prompt_logprobs:
        n = len(spec.prompt_tokens)
        entries = prompt_logprob_entries(choices, n)
        if spec.prompt_logprobs:
            resp.prompt_logprobs = prompt_token_logprobs(entries, spec.prompt_tokens).tobytes()
        if spec.topk_prompt_logprobs > 0:
            k = spec.topk_prompt_logprobs
            rows = [None] + [_prompt_topk(entries[i], k) for i in range(1, n)]
            resp.topk_prompt_logprobs.CopyFrom(_topk_rows(rows, k))
    usage = completion.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    if isinstance(cached, int) and cached > 0:
        resp.prompt_cache_hit_tokens = cached
    return resp


def prompt_logprob_entries(choices: Sequence[Mapping[str, Any]], n: int) -> list[Any]:
    """vLLM's ``prompt_logprobs`` from the choices of a ``/v1/completions`` answer (the same in
    every choice): one entry per prompt token (``None`` first, then ``{token id: {logprob}}``)."""
    entries = choices[0].get("prompt_logprobs") if choices else None
    if not isinstance(entries, list) or len(entries) != n:
        raise SamplerFailed("vLLM response lacks prompt logprobs")
    return entries


def prompt_token_logprobs(entries: list[Any], tokens: Sequence[int]) -> np.ndarray:
    """The logprob of each prompt token after the ones before it (float32; NaN at position 0)."""
    vals = np.full(len(tokens), np.nan, dtype="<f4")
    for i in range(1, len(tokens)):
        row = entries[i]
        v = row.get(str(tokens[i])) if row else None
        if v is None:
            raise SamplerFailed(f"vLLM prompt logprobs lack the prompt token at position {i}")
        vals[i] = v["logprob"]
    return vals


def completion_to_sample_response(spec: SampleSpec, completion: Mapping[str, Any]) -> bytes:
    """Serialized ``SampleResponse`` (the ``application/x-protobuf`` future payload)."""
    return build_sample_response(spec, completion).SerializeToString()
