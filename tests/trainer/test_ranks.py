"""A trainer of several ranks gives the results of one: the base sharded over 2 ranks (FSDP2,
gloo), and 2 data-parallel replicas, against 1 rank, for every loss of both dialects, the
optimizer, saves and loads; a checkpoint saved on 2 ranks loads on 1 and the reverse."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import redis
from tinker.proto import response_conv

from data_plane.wire import op_bodies
from data_plane.wire.queue import Dialect, FutureState, OpKind
from tests.trainer.conftest import Driver, fwd_request, sft_batch
from tests.trainer.loops_support import loops_request, strict_json
from tests.trainer.loss_cases import CASES

RTOL = 1e-4  # the bound for CPU fp32 (sums over ranks and replicas run in another order)
LR = 1e-2
EVAL = sft_batch(99, n=3)
# three shapes of the same trainer; micro-batches of 64 tokens split each batch into several,
# so the replicas really take different shares
SHAPES = {"1 rank": {}, "2 ranks": {"ranks": 2}, "2 replicas": {"ranks": 2, "replicas": 2}}


def _eval(d: Driver) -> list[np.ndarray]:
    out = d.ok_proto(d.fwd(EVAL, forward_only=True))
    sdk = response_conv.deserialize_forward_backward_output(out.SerializeToString())
    return [o["logprobs"].to_numpy() for o in sdk.loss_fn_outputs]


def _script(d: Driver) -> dict:
    """Every loss, two optimizer steps, a Loops call with top-k, a save."""
    got: dict = {}
    assert d.ok_json(d.create(rank=8, seed=0))["type"] == "create_model"
    for name, data, config in CASES:
        out = d.ok_proto(d.fwd(data(), loss_fn=name.split()[0], config=config))
        sdk = response_conv.deserialize_forward_backward_output(out.SerializeToString())
        got[name] = (
            sdk.metrics["loss:sum"],
            [{k: v.to_numpy() for k, v in o.items()} for o in sdk.loss_fn_outputs],
        )
    got["grad_norm 1"] = d.ok_json(d.optim(learning_rate=LR))["metrics"]["grad_norm:mean"]
    loops_data = []
    for x in sft_batch(8, n=5):
        t = x["target_tokens"].copy()
        t[:3] = -100
        loops_data.append({"tokens": x["tokens"], "target_tokens": t})
    raw = loops_request(loops_data, config={"top_k_logprobs": 4})
    res = d.result(d.send(OpKind.FORWARD_BACKWARD, raw, dialect=Dialect.LOOPS))
    assert res.state == FutureState.DONE, res.body
    got["loops"] = strict_json(res.body)
    got["grad_norm 2"] = d.ok_json(d.optim(learning_rate=LR))["metrics"]["grad_norm:mean"]
    got["eval"] = _eval(d)
    prefix = f"runs/{d.run_id}/weights/final"
    c = d.completion(d.save("weights", prefix, "final"))
    assert c.error is None, c.error
    got["checkpoint"] = op_bodies.LoadWeightsBody(storage_prefix=prefix, tinker_path=c.result["path"], optimizer=True)
    return got


def _close(a: float, b: float, scale: float = 0.0) -> None:
    assert b == pytest.approx(a, rel=RTOL, abs=RTOL * scale)


def _same(ref: dict, other: dict, shape: str) -> None:
    for name, _data, _config in CASES:
        (loss_a, outs_a), (loss_b, outs_b) = ref[name], other[name]
        scale = sum(float(np.abs(o.get("elementwise_loss", 0)).sum()) for o in outs_a)
        _close(loss_a, loss_b, scale)
        assert len(outs_a) == len(outs_b), (shape, name)
        for oa, ob in zip(outs_a, outs_b, strict=True):
            assert oa.keys() == ob.keys(), (shape, name)
            for k in oa:
                np.testing.assert_allclose(ob[k], oa[k], rtol=RTOL, atol=1e-5, err_msg=f"{shape} {name} {k}")
    for k in ("grad_norm 1", "grad_norm 2"):
        _close(ref[k], other[k])
    _close(ref["loops"]["loss"], other["loops"]["loss"])
    for oa, ob in zip(ref["loops"]["loss_fn_outputs"], other["loops"]["loss_fn_outputs"], strict=True):
        for k in oa:
            a = np.asarray(oa[k]["data"], dtype=float)
            b = np.asarray(ob[k]["data"], dtype=float)
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-5, err_msg=f"{shape} loops {k}")
    for a, b in zip(ref["eval"], other["eval"], strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-5)


def _next_run(d: Driver, run_id: str) -> Driver:
    """Attach another run to ``d``'s trainer (the trainer drops the previous run's adapter)."""
    nd = Driver(d.r, run_id, run_id, d.deployment_id, proc=d.proc, _log=d._log)
    nd.attach()
    return nd


def test_ranks_and_replicas_match_one_rank(start_worker, valkey_url):
    drivers = {
        shape: start_worker(f"ranks-{i}", microbatch_tokens=64, **kw) for i, (shape, kw) in enumerate(SHAPES.items())
    }
    results = {shape: _script(d) for shape, d in drivers.items()}
    ref = results["1 rank"]
    assert ref["grad_norm 1"] > 0
    for shape in ("2 ranks", "2 replicas"):
        _same(ref, results[shape], shape)
    for d in drivers.values():
        assert d.proc is not None and d.proc.poll() is None
    # every rank of the sharded trainers is alive and following (torchrun + its 2 ranks)
    assert "following rank 0" in drivers["2 ranks"].logs()

    # a checkpoint of 2 ranks loads on 1, and one of 1 rank on 2 ranks (a new run each): the
    # same weights and optimizer, so the same evaluation and the same next step
    loaded = {
        "1 rank": _next_run(drivers["1 rank"], "ranks-load-1"),
        "2 ranks": _next_run(drivers["2 ranks"], "ranks-load-2"),
    }
    sources = {"1 rank": results["2 ranks"], "2 ranks": results["1 rank"]}
    steps = {}
    for shape, d in loaded.items():
        body = sources[shape]["checkpoint"]
        assert d.ok_json(d.send(OpKind.LOAD_WEIGHTS, op_bodies.encode(body)))["type"] == "load_weights"
        for a, b in zip(sources[shape]["eval"], _eval(d), strict=True):
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-5)
        loss = d.ok_proto(d.fwd(sft_batch(1))).metrics["loss:sum"]
        steps[shape] = (loss, d.ok_json(d.optim(learning_rate=LR))["metrics"]["grad_norm:mean"], _eval(d))
    _close(steps["1 rank"][0], steps["2 ranks"][0])
    _close(steps["1 rank"][1], steps["2 ranks"][1])
    for a, b in zip(steps["1 rank"][2], steps["2 ranks"][2], strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-5)


def test_a_bad_input_fails_the_op_on_every_rank_and_the_trainer_goes_on(start_worker, valkey_url):
    d = start_worker("ranks-bad", microbatch_tokens=64, ranks=2, replicas=2)
    d.ok_json(d.create(rank=4, seed=1))
    good = d.ok_proto(d.fwd(sft_batch(1))).metrics["loss:sum"]
    # a non-finite loss found by one replica only: the call fails everywhere, gradients unchanged
    rl = [
        {
            "tokens": x["tokens"],
            "target_tokens": x["target_tokens"],
            "logprobs": np.full(len(x["tokens"]), -1e4 if i == 3 else -7.0, np.float32),
            "advantages": np.ones(len(x["tokens"]), np.float32),
        }
        for i, x in enumerate(sft_batch(2, n=4))
    ]
    res = d.result(d.send(OpKind.FORWARD_BACKWARD, fwd_request(rl, loss_fn="importance_sampling")))
    assert res.state == FutureState.FAILED and "not finite" in json.loads(res.body)["error"]
    norm = d.ok_json(d.optim(learning_rate=LR))["metrics"]["grad_norm:mean"]
    # the same on one rank: one good call's gradients only
    ref = start_worker("ranks-bad-ref", microbatch_tokens=64)
    ref.ok_json(ref.create(rank=4, seed=1))
    _close(ref.ok_proto(ref.fwd(sft_batch(1))).metrics["loss:sum"], good)
    _close(ref.ok_json(ref.optim(learning_rate=LR))["metrics"]["grad_norm:mean"], norm)
    assert d.proc is not None and d.proc.poll() is None
    r = redis.Redis.from_url(valkey_url)
    assert r.ping()


def test_sigterm_stops_the_group_after_a_final_snapshot_and_the_run_resumes_on_a_new_one(start_worker):
    """What scaling to zero does to a two-rank trainer: SIGTERM to torchrun (it passes it on to
    both ranks); the leader writes the final snapshot and stops its follower;
    a new group attached to the run restores it and goes on exactly where it was."""
    d = start_worker("ranks-term", microbatch_tokens=64, ranks=2, deployment_id="dep-ranks-term")
    d.ok_json(d.create(rank=4, seed=2))
    first = d.ok_proto(d.fwd(sft_batch(3))).metrics["loss:sum"]
    d.ok_json(d.optim(learning_rate=LR))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(60)  # torchrun itself exits 1 on a signal (SignalException); its ranks stop cleanly
    logs = d.logs()
    assert "final snapshot of run ranks-term" in logs and "rank 1 exits" in logs, logs
    assert d.run_state()["snapshot_seq"] == "3"

    again = start_worker("ranks-term", microbatch_tokens=64, ranks=2, deployment_id="dep-ranks-term")
    again.seq = d.seq
    second = again.ok_proto(again.fwd(sft_batch(3))).metrics["loss:sum"]
    # the same run one step later, on one rank: its second loss is the two-rank run's
    ref = start_worker("ranks-term-ref", microbatch_tokens=64)
    ref.ok_json(ref.create(rank=4, seed=2))
    _close(ref.ok_proto(ref.fwd(sft_batch(3))).metrics["loss:sum"], first)
    ref.ok_json(ref.optim(learning_rate=LR))
    _close(ref.ok_proto(ref.fwd(sft_batch(3))).metrics["loss:sum"], second)
    assert int(again.run_state()["resumes"]) == 1
