"""Per-run sampling telemetry: the request meter's sample and token counters (what one process
counts, several flushes adding into one row, a failed flush keeping its counts) and
GET /v1/loops/runs/{id}/sampling_metrics (steps, rates, totals, isolation, bad input). Real
Postgres and Redis; the SDKs' sampling through a live vLLM is in tests/e2e/test_train_then_sample.py."""

from __future__ import annotations

import time
from unittest import mock

import pytest
from sqlalchemy import select

from control_plane.db.models import RequestBucket
from control_plane.metering.requests import (
    RUN_SAMPLING,
    SAMPLER_SAMPLING,
    TAP_LIMIT,
    Tokens,
    TokenTap,
    sampling_resource,
)
from tests.control_plane.test_training_metrics import run_of


async def get_sampling(api, t, run_id: str, **params):
    return await api.client.get(f"/v1/loops/runs/{run_id}/sampling_metrics", headers=t.headers, params=params)


def test_tokens_of_an_openai_answer():
    answer = {"choices": [{"text": "a"}, {"text": "b"}], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}
    assert Tokens.of_completion(answer) == Tokens(samples=2, prompt=5, completion=9)
    # an error body, or junk where counts belong, counts nothing
    assert Tokens.of_completion({"error": {"message": "no"}}) is None
    assert Tokens.of_completion([1, 2]) is None
    odd = {"choices": [], "usage": {"prompt_tokens": "5", "completion_tokens": -3}}
    assert Tokens.of_completion(odd) == Tokens(samples=0, prompt=0, completion=0)


def test_sampling_is_counted_for_the_run_or_else_the_sampler():
    assert sampling_resource("run-1", "smp-1") == (RUN_SAMPLING, "run-1")
    assert sampling_resource(None, "smp-1") == (SAMPLER_SAMPLING, "smp-1")


async def test_steps_rates_and_totals_of_a_runs_sampling(api):
    t, run_id = await run_of(api)
    meter = api.runtime.meter
    now = time.time()
    minute = int(now // 60) * 60
    # two requests in one minute, flushed apart (two flushes add into one row), a failure and a
    # request the minute before
    with mock.patch("control_plane.metering.requests.time.time", return_value=minute + 1):
        meter.record(RUN_SAMPLING, run_id, 200, 40.0, Tokens(samples=3, prompt=10, completion=21))
        await meter.flush()
        meter.record(RUN_SAMPLING, run_id, 200, 400.0, Tokens(samples=1, prompt=4, completion=7))
        meter.record(RUN_SAMPLING, run_id, 503, 2.0)
    with mock.patch("control_plane.metering.requests.time.time", return_value=minute - 59):
        meter.record(RUN_SAMPLING, run_id, 200, 7.0, Tokens(samples=2, prompt=6, completion=8))
    await meter.flush()
    async with api.runtime.db.session() as s:
        rows = (await s.execute(select(RequestBucket).where(RequestBucket.resource_id == run_id))).scalars().all()
    assert sorted((r.count_2xx, r.count_5xx, r.samples, r.prompt_tokens, r.completion_tokens) for r in rows) == [
        (1, 0, 2, 6, 8),
        (2, 1, 4, 14, 28),
    ]

    start_ms, end_ms = (minute - 60) * 1000, (minute + 60) * 1000
    r = await get_sampling(api, t, run_id, start_epoch_millis=start_ms, end_epoch_millis=end_ms)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run_id"] == run_id and body["step_seconds"] == 60
    assert body["totals"] == {"requests": 4, "errors": 1, "samples": 6, "prompt_tokens": 20, "completion_tokens": 36}
    m = body["metrics"]
    assert [p["value"] for p in m["samples"]] == [2, 4]
    assert [p["value"] for p in m["completion_tokens"]] == [8, 28]
    assert [p["value"] for p in m["inference_volume"]] == [1, 3]
    assert m["inference_volume_by_status"][1]["status_5xx"] == 1
    # p50 of the later minute: 2 ms, 40 ms, 400 ms -> the 50 ms bucket
    assert m["response_time_stats"][1]["p50"] == 50.0 and m["response_time_stats"][1]["p99"] == 500.0

    # one step over both minutes, tokens as a rate per second
    r = await get_sampling(
        api, t, run_id, start_epoch_millis=start_ms, end_epoch_millis=end_ms, step_seconds=120, time_divisor_seconds=1
    )
    m = r.json()["metrics"]
    assert len(m["completion_tokens"]) == 1
    assert m["completion_tokens"][0]["value"] == pytest.approx(36 / 120)
    # a window without them: zeros, no points
    r = await get_sampling(api, t, run_id, start_epoch_millis=start_ms - 3_600_000, end_epoch_millis=start_ms)
    assert r.json()["totals"]["requests"] == 0 and r.json()["metrics"]["samples"] == []


async def test_a_failed_flush_keeps_the_token_counts(api):
    _t, run_id = await run_of(api)
    meter = api.runtime.meter
    meter.record(RUN_SAMPLING, run_id, 200, 5.0, Tokens(samples=2, prompt=3, completion=4))
    with (
        mock.patch.object(api.runtime.db, "transaction", side_effect=RuntimeError("db down")),
        pytest.raises(RuntimeError),
    ):
        await meter.flush()
    meter.record(RUN_SAMPLING, run_id, 200, 5.0, Tokens(samples=1, prompt=1, completion=1))
    await meter.flush()
    async with api.runtime.db.session() as s:
        got = (
            await s.execute(
                select(RequestBucket.samples, RequestBucket.prompt_tokens, RequestBucket.completion_tokens).where(
                    RequestBucket.resource_id == run_id
                )
            )
        ).all()
    assert [tuple(g) for g in got] == [(3, 4, 5)]


async def test_another_orgs_run_is_not_found_and_bad_params_name_their_field(api):
    t, run_id = await run_of(api)
    other = await api.tenant("globex")
    assert (await get_sampling(api, other, run_id)).status_code == 404
    assert (await get_sampling(api, t, "no-such-run")).status_code == 404
    ok = await get_sampling(api, t, run_id)
    assert ok.status_code == 200 and ok.json()["totals"]["requests"] == 0
    for params, field in (
        ({"step_seconds": 90}, "step_seconds"),
        ({"step_seconds": 30}, "step_seconds"),
        ({"start_epoch_millis": 2_000_000, "end_epoch_millis": 1_000_000}, "start_epoch_millis"),
        ({"start_epoch_millis": -1}, "start_epoch_millis"),
        ({"time_divisor_seconds": 0}, "time_divisor_seconds"),
        ({"start_epoch_millis": 0, "end_epoch_millis": 10**12}, "step_seconds"),  # too many steps
    ):
        r = await get_sampling(api, t, run_id, **params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["field"] == field, (params, r.json())


def test_a_tap_counts_a_json_answer_and_a_streams_usage_chunk():
    answer = b'{"choices": [{"text": "a"}], "usage": {"prompt_tokens": 4, "completion_tokens": 6}}'
    tap = TokenTap("application/json")
    for i in range(0, len(answer), 7):  # in pieces, as a proxy passes it on
        tap.feed(answer[i : i + 7])
    assert tap.tokens() == Tokens(samples=1, prompt=4, completion=6)

    events = (
        b'data: {"choices": [{"index": 0, "text": "a"}], "usage": null}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 8}}\n\n'
        b"data: [DONE]\n\n"
    )
    tap = TokenTap("text/event-stream; charset=utf-8", requested_n=2)
    tap.feed(events[:50])
    tap.feed(events[50:])
    assert tap.tokens() == Tokens(samples=2, prompt=3, completion=8)
    # a stream that did not ask for usage counts its sequences only
    tap = TokenTap("text/event-stream", requested_n=3)
    tap.feed(b'data: {"choices": [{"index": 0, "text": "a"}], "usage": null}\n\ndata: [DONE]\n\n')
    assert tap.tokens() == Tokens(samples=3)
    # a JSON answer past the limit is not counted rather than held in memory
    tap = TokenTap("application/json")
    tap.feed(b" " * (TAP_LIMIT + 1))
    tap.feed(answer)
    assert tap.tokens() is None


async def test_a_request_in_flight_across_a_flush_and_a_minute_leaves_no_empty_latency_point(api):
    """A flush while a request is in flight writes its minute's concurrency alone; when the
    request ends in the next minute, the first minute has no latency: it gets no point (a null
    percentile would break every chart and client that reads them)."""
    t, run_id = await run_of(api)
    meter = api.runtime.meter
    minute = int(time.time() // 60) * 60 - 120
    clock = "control_plane.metering.requests.time.time"
    with mock.patch(clock, return_value=minute + 50):
        tracking = meter.track(RUN_SAMPLING, run_id)
        out = tracking.__enter__()
        await meter.flush()
    with mock.patch(clock, return_value=minute + 65):
        out.status = 200
        tracking.__exit__(None, None, None)
    await meter.flush()
    r = await get_sampling(api, t, run_id, start_epoch_millis=minute * 1000, end_epoch_millis=(minute + 120) * 1000)
    m = r.json()["metrics"]
    assert [p["value"] for p in m["concurrent_requests"]] == [1, 0]
    assert [p["value"] for p in m["inference_volume"]] == [0, 1]
    (only,) = m["response_time_stats"]
    assert only["timestamp"] == m["inference_volume"][1]["timestamp"] and only["p50"] is not None
