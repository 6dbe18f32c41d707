"""The Loops dialect of forward / forward_backward on the tiny model: -100 masking, optional
weights, per-token mean with the normalization deferred to optim_step, refusing to mix
normalized and summed gradients, top-k logprobs, and the JSON answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinker.proto import response_conv

from data_plane.trainer.engine import NonFiniteLoss
from data_plane.trainer.errors import UserError
from data_plane.trainer.loops_output import encode_forward_backward, tensor_data
from data_plane.wire import tinker_wire_pb2 as pb
from tests.trainer.conftest import fwd_request, sft_batch
from tests.trainer.loops_support import (
    grads,
    loops_request,
    loops_run,
    new_model,
    params,
    step,
    strict_json,
    to_numpy,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def make_model(tiny_model, tmp_path):
    return lambda **kw: new_model(tiny_model, tmp_path / "store", **kw)


def loopsify(datums: list[dict], keep_weights: bool = False) -> list[dict]:
    """Tinker SFT datums (weights 0 on the prompt) -> Loops datums (-100 on the prompt)."""
    out = []
    for d in datums:
        t = d["target_tokens"].copy()
        t[d["weights"] == 0] = -100
        x = {"tokens": d["tokens"], "target_tokens": t}
        if keep_weights:
            x["weights"] = d["weights"]
        out.append(x)
    return out


def tinker(m, datums, **kw):
    return response_conv.deserialize_forward_backward_output(m.forward_backward(fwd_request(datums, **kw)))


def full_logprobs(m, tokens) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(m.peft(input_ids=torch.as_tensor(tokens)[None]).logits[0], -1)


def test_ignored_positions_match_tinker_weights(make_model):
    data = sft_batch(0, n=3)
    t_model, l_model = make_model(), make_model()
    ref = tinker(t_model, data)
    out = loops_run(l_model, loopsify(data))
    active = sum(int((d["weights"] != 0).sum()) for d in data)
    assert set(out) == {"loss", "loss_fn_output_type", "loss_fn_outputs", "metrics"}
    assert out["loss_fn_output_type"] == "TensorData"
    assert out["loss"] == pytest.approx(ref.metrics["loss:sum"] / active, rel=1e-5)
    assert out["metrics"] == pytest.approx(
        {"loss": out["loss"], "num_tokens": float(active), "skip_token_normalization": 0.0}
    )
    assert len(out["loss_fn_outputs"]) == len(data)
    for d, o, r in zip(data, out["loss_fn_outputs"], ref.loss_fn_outputs):
        assert set(o) == {"logprobs", "elementwise_loss"}
        assert o["logprobs"]["dtype"] == "float32" and o["logprobs"]["shape"] == [len(d["tokens"])]
        assert o["logprobs"]["data"][:3] == [None] * 3 and o["elementwise_loss"]["data"][:3] == [None] * 3
        lp, el = to_numpy(o["logprobs"]), to_numpy(o["elementwise_loss"])
        np.testing.assert_allclose(lp[3:], r["logprobs"].to_numpy()[3:], **TOL)
        np.testing.assert_allclose(el[3:], -lp[3:], **TOL)
    # backward accumulates the sum: the same gradients as the Tinker call
    g1, g2 = grads(t_model), grads(l_model)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)
    assert l_model.engine.accumulation == ("mean", active)


def test_weights_are_optional_and_zero_weights_count_nothing_but_are_scored(make_model):
    m = make_model()
    d = loopsify(sft_batch(1, n=1), keep_weights=True)[0]
    n = len(d["tokens"])
    w = np.linspace(0.5, 2.0, n).astype(np.float32)
    w[5] = 0.0
    d["weights"] = w
    out = loops_run(m, [d], forward_only=True)
    active = (d["target_tokens"] != -100) & (w != 0)
    scored = d["target_tokens"] != -100
    lp = to_numpy(out["loss_fn_outputs"][0]["logprobs"])
    # NaN only where there is no target: a zero weight still gets its logprob (the SDK's
    # forward_backward_custom reads logprobs with all-zero weights)
    assert np.isnan(lp[~scored]).all() and np.isfinite(lp[scored]).all() and not active[5]
    full = full_logprobs(m, d["tokens"])[
        torch.arange(n), torch.as_tensor(np.where(active, d["target_tokens"], 0))
    ].numpy()
    assert out["metrics"]["num_tokens"] == active.sum()
    assert out["loss"] == pytest.approx(float(-(full * w)[active].sum() / active.sum()), rel=1e-5)
    assert m.engine.accumulation == (None, 0) and grads(m) == {}  # forward_only
    d["weights"] = np.zeros(n, np.float32)
    zero = loops_run(m, [d], forward_only=True)
    assert zero["metrics"]["num_tokens"] == 0 and zero["loss"] == 0.0
    np.testing.assert_allclose(to_numpy(zero["loss_fn_outputs"][0]["logprobs"])[scored], lp[scored], rtol=1e-6)


def test_deferred_normalization_equals_one_call(make_model):
    a, b = loopsify(sft_batch(2, n=2)), loopsify(sft_batch(3, n=3, length=17))
    split, whole = make_model(), make_model()
    la = loops_run(split, a)
    lb = loops_run(split, b)
    one = loops_run(whole, a + b)
    count = la["metrics"]["num_tokens"] + lb["metrics"]["num_tokens"]
    assert one["metrics"]["num_tokens"] == count
    assert one["loss"] == pytest.approx(
        (la["loss"] * la["metrics"]["num_tokens"] + lb["loss"] * lb["metrics"]["num_tokens"]) / count, rel=1e-5
    )
    assert split.engine.accumulation == whole.engine.accumulation == ("mean", count)
    summed = grads(whole)
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in summed.values()]))) / count
    m1 = step(split, grad_clip_norm=norm / 2)["metrics"]
    m2 = step(whole, grad_clip_norm=norm / 2)["metrics"]
    # the norm is taken after the division, and clipping sees it
    assert m1["grad_norm:mean"] == pytest.approx(norm, rel=1e-4)
    assert m2["grad_norm:mean"] == pytest.approx(norm, rel=1e-4)
    assert m1["grad_clipped:mean"] == m2["grad_clipped:mean"] == 1.0
    p1, p2 = params(split), params(whole)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-6)
    assert split.engine.accumulation == (None, 0)


def test_normalized_step_equals_tinker_step_on_prescaled_weights(make_model):
    data = sft_batch(4, n=2)
    count = sum(int((d["weights"] != 0).sum()) for d in data)
    loops, tink = make_model(), make_model()
    loops_run(loops, loopsify(data))
    tinker(tink, [dict(d, weights=d["weights"] / count) for d in data])
    step(loops, grad_clip_norm=0.0)
    step(tink, grad_clip_norm=0.0)
    p1, p2 = params(loops), params(tink)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-6)


def test_skip_token_normalization_is_a_plain_sum(make_model):
    data = sft_batch(5, n=2)
    loops, tink = make_model(), make_model()
    out = loops_run(loops, loopsify(data), config={"skip_token_normalization": 1})
    ref = tinker(tink, data)
    assert out["loss"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-5)
    assert out["metrics"]["skip_token_normalization"] == 1.0
    assert loops.engine.accumulation == ("sum", 0)
    tinker(loops, data)  # summed calls mix fine
    tinker(tink, data)
    step(loops)
    step(tink)
    p1, p2 = params(loops), params(tink)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-6)


def test_mixing_normalized_and_summed_is_refused_before_running(make_model):
    m = make_model()
    data = sft_batch(6, n=2)
    loops_run(m, loopsify(data))
    before, acc = grads(m), m.engine.accumulation
    with pytest.raises(UserError, match="token-normalized.*call optim_step first"):
        tinker(m, data)
    with pytest.raises(UserError, match="call optim_step first"):
        loops_run(m, loopsify(data), config={"skip_token_normalization": 1})
    # forward-only calls of either kind are fine and change nothing
    loops_run(m, loopsify(data), forward_only=True, config={"skip_token_normalization": 1})
    tinker(m, data, forward_only=True)
    assert m.engine.accumulation == acc
    after = grads(m)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    step(m)
    tinker(m, data)  # a new step may start summed ...
    with pytest.raises(UserError, match="summed.*call optim_step first"):
        loops_run(m, loopsify(data))  # ... and then refuses normalized calls
    assert m.engine.accumulation == ("sum", 0)


def test_failed_call_keeps_the_counters(make_model):
    m = make_model()
    data = loopsify(sft_batch(7, n=2))
    loops_run(m, data)
    before, acc = grads(m), m.engine.accumulation
    rl = [
        {
            "tokens": d["tokens"],
            "target_tokens": d["target_tokens"],
            "logprobs": np.full(len(d["tokens"]), -1e4, np.float32),
            "advantages": np.ones(len(d["tokens"]), np.float32),
        }
        for d in data
    ]
    with pytest.raises(NonFiniteLoss):
        loops_run(m, rl, loss_fn="importance_sampling")
    assert m.engine.accumulation == acc
    after = grads(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rl_loss_with_weights_and_ignored_prompt(make_model):
    m = make_model()
    d = loopsify(sft_batch(8, n=1))[0]
    n = len(d["tokens"])
    rng = np.random.default_rng(0)
    mu = rng.uniform(-9, -6, n).astype(np.float32)
    mu[:3] = np.nan  # the SDK sends null (NaN) where there is no sampler logprob: ignored positions
    adv = rng.normal(size=n).astype(np.float32)
    w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    out = loops_run(m, [dict(d, logprobs=mu, advantages=adv, weights=w)], loss_fn="importance_sampling")
    o = out["loss_fn_outputs"][0]
    lp, el = to_numpy(o["logprobs"]), to_numpy(o["elementwise_loss"])
    want = -np.exp(lp - mu) * adv * w
    np.testing.assert_allclose(el[3:], want[3:], rtol=1e-4)
    assert np.isnan(el[:3]).all()
    assert out["loss"] == pytest.approx(float(want[3:].sum() / (n - 3)), rel=1e-4)


def test_two_dim_targets_with_ignored_cells(make_model):
    m = make_model()
    rng = np.random.default_rng(1)
    n, k = 7, 3
    tokens = rng.integers(6, 2048, n)
    targets = rng.integers(6, 2048, (n, k))
    targets[:2] = -100  # prompt rows
    targets[4, 1] = -100  # one cell
    w = np.full((n, k), 1.0 / k, np.float32)
    out = loops_run(m, [{"tokens": tokens, "target_tokens": targets, "weights": w}])
    lp = to_numpy(out["loss_fn_outputs"][0]["logprobs"])
    assert lp.shape == (n, k) and out["loss_fn_outputs"][0]["logprobs"]["shape"] == [n, k]
    active = targets != -100
    assert np.isnan(lp[~active]).all()
    full = full_logprobs(m, tokens).gather(-1, torch.as_tensor(np.where(active, targets, 0))).numpy()
    np.testing.assert_allclose(lp[active], full[active], **TOL)
    assert out["metrics"]["num_tokens"] == 5  # positions with an active cell
    assert out["loss"] == pytest.approx(float(-(full * w)[active].sum() / 5), rel=1e-5)


def test_top_k_logprobs(make_model):
    m = make_model(microbatch_tokens=40)  # several micro-batches
    data = loopsify(sft_batch(9, n=3))
    out = loops_run(m, data, forward_only=True, config={"top_k_logprobs": 4})
    for d, o in zip(data, out["loss_fn_outputs"]):
        n = len(d["tokens"])
        assert set(o) == {"logprobs", "elementwise_loss", "top_k_logprobs", "top_k_token_ids"}
        assert o["top_k_logprobs"]["shape"] == [n, 4] and o["top_k_token_ids"]["dtype"] == "int64"
        vals, ids = to_numpy(o["top_k_logprobs"]), to_numpy(o["top_k_token_ids"])
        want_vals, want_ids = full_logprobs(m, d["tokens"]).topk(4, -1)
        np.testing.assert_allclose(vals[3:], want_vals[3:].numpy(), **TOL)
        np.testing.assert_array_equal(ids[3:], want_ids[3:].numpy())
        assert np.isnan(vals[:3]).all() and (ids[:3] == -1).all()
        assert np.all(vals[3:, 0] >= to_numpy(o["logprobs"])[3:] - 1e-5)
    plain = loops_run(m, data, forward_only=True)
    assert set(plain["loss_fn_outputs"][0]) == {"logprobs", "elementwise_loss"}


@pytest.mark.parametrize(
    "config, match",
    [
        ({"top_k_logprobs": 21}, "top_k_logprobs must be an integer in \\[0, 20\\]"),
        ({"top_k_logprobs": 2.5}, "top_k_logprobs"),
        ({"top_k_logprobs": -1}, "top_k_logprobs"),
        ({"top_k_logprobs": float("nan")}, "top_k_logprobs"),
        ({"skip_token_normalization": 2}, "skip_token_normalization must be an integer in \\[0, 1\\]"),
        ({"skip_token_normalization": 0.5}, "skip_token_normalization"),
        ({"beta": 1.0}, "unknown loss_fn_config"),
    ],
)
def test_bad_options(make_model, config, match):
    m = make_model()
    with pytest.raises(UserError, match=match):
        loops_run(m, loopsify(sft_batch(0, n=1)), config=config)


def test_bad_loops_inputs(make_model):
    m = make_model()
    d = loopsify(sft_batch(0, n=1))[0]
    bad = dict(d, target_tokens=d["target_tokens"].copy())
    bad["target_tokens"][4] = -5
    with pytest.raises(UserError, match="outside the vocabulary"):
        loops_run(m, [bad])
    with pytest.raises(UserError, match="missing 'advantages'"):
        loops_run(m, [dict(d, logprobs=np.zeros(len(d["tokens"]), np.float32))], loss_fn="ppo")
    nan_w = np.ones(len(d["tokens"]), np.float32)
    nan_w[5] = np.nan
    with pytest.raises(UserError, match="NaN"):
        loops_run(m, [dict(d, weights=nan_w)])
    req = pb.ForwardBackwardRequest.FromString(loops_request([d]))
    req.loss_fn_config_v2["top_k_logprobs"].text = "3"
    with pytest.raises(UserError, match="top_k_logprobs"):
        m.loops_forward_backward(req.SerializeToString())
    with pytest.raises(UserError, match="not a valid"):
        m.loops_forward_backward(b"\xff\xff")


def test_empty_request(make_model):
    m = make_model()
    out = loops_run(m, [])
    assert out["loss"] == 0.0 and out["loss_fn_outputs"] == [] and out["metrics"]["num_tokens"] == 0.0


def test_json_encoding():
    raw = encode_forward_backward(0.0, [{"x": np.array([1.5, np.nan, -np.inf], np.float32)}], {})
    assert strict_json(raw)["loss_fn_outputs"] == [{"x": {"data": [1.5, None, None], "dtype": "float32", "shape": [3]}}]
    # every float32 comes back as exactly itself (shortest round-trip digits), tiny and huge too
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.standard_normal(4096), rng.standard_normal(64) * 1e-30, rng.standard_normal(64) * 1e30]
    )
    values = values.astype(np.float32)
    back = strict_json(encode_forward_backward(0.0, [{"x": values}], {}))["loss_fn_outputs"][0]["x"]["data"]
    assert np.array_equal(np.array(back, np.float32), values)
    assert tensor_data(np.arange(6, dtype=np.int64).reshape(2, 3)) == {
        "data": [0, 1, 2, 3, 4, 5],
        "dtype": "int64",
        "shape": [2, 3],
    }
    assert tensor_data(np.zeros((0, 4), np.float32)) == {"data": [], "dtype": "float32", "shape": [0, 4]}
    raw = encode_forward_backward(
        float("nan"), [{"logprobs": np.array([np.nan, -0.5], np.float32)}], {"loss": math.inf, "num_tokens": 1.0}
    )
    assert b"NaN" not in raw and b"Infinity" not in raw
    out = strict_json(raw)
    assert out["loss"] is None and out["metrics"] == {"loss": None, "num_tokens": 1.0}
    assert out["loss_fn_outputs"] == [{"logprobs": {"data": [None, -0.5], "dtype": "float32", "shape": [2]}}]
