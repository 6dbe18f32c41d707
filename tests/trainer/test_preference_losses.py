"""dpo and dppo: hand-computed values and gradients, config validation, pair-preserving
micro-batching, and both dialects through the engine on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinker.proto import response_conv

from data_plane.trainer.batches import Prepared, plan_microbatches
from data_plane.trainer.errors import UserError
from data_plane.trainer.losses import (
    dpo,
    dppo,
    get_loss,
    resolve_config,
    sequence_scores,
)
from tests.trainer.conftest import fwd_request, sft_batch
from tests.trainer.loops_support import (
    grads,
    loops_run,
    new_model,
    params,
    step,
    to_numpy,
)

TLP = [math.log(0.5), math.log(0.25), math.log(0.8), math.log(0.1)]
MU = [math.log(0.4), math.log(0.5), math.log(0.5), math.log(0.6)]  # r = 1.25, 0.5, 1.6, 1/6
ADV = [1.0, -2.0, 0.5, 1.0]
R = [1.25, 0.5, 1.6, 1 / 6]  # D = |p - mu_p| = 0.1, 0.25, 0.3, 0.5


def _dppo(config):
    t = torch.tensor(TLP, dtype=torch.float64, requires_grad=True)
    inputs = {"logprobs": torch.tensor(MU, dtype=torch.float64), "advantages": torch.tensor(ADV, dtype=torch.float64)}
    el = dppo(t, inputs, resolve_config("dppo", config, {}))
    el.sum().backward()
    return el.detach().tolist(), t.grad.tolist()


def test_dppo_defaults():
    el, grad = _dppo({})
    # token 0: A>0, r>1, D=0.1 <= 0.2 kept; token 1: A<0, r<1, D=0.25 > 0.2 masked;
    # token 2: A>0, r>1, D=0.3 > 0.2 masked; token 3: A>0 but r<1 (moving against A): kept
    keep = [1.0, 0.0, 0.0, 1.0]
    kl = 1e-3
    want = [-keep[i] * R[i] * ADV[i] + kl * (R[i] - 1 - math.log(R[i])) for i in range(4)]
    assert el == pytest.approx(want)
    assert grad == pytest.approx([-keep[i] * R[i] * ADV[i] + kl * (R[i] - 1) for i in range(4)])


def test_dppo_custom_config():
    cfg = {"dppo_mask_high": 0.5, "dppo_mask_low": 0.1, "adv_tau": 2.0, "kl_tau": 0.1}
    el, grad = _dppo(cfg)
    keep = [1.0, 0.0, 1.0, 1.0]  # token 2: D=0.3 <= 0.5 now kept; token 1: D=0.25 > 0.1 masked
    a = [x / 2.0 for x in ADV]
    assert el == pytest.approx([-keep[i] * R[i] * a[i] + 0.1 * (R[i] - 1 - math.log(R[i])) for i in range(4)])
    assert grad == pytest.approx([-keep[i] * R[i] * a[i] + 0.1 * (R[i] - 1) for i in range(4)])


def test_dpo_scores_values_and_gradients():
    # 4 datums (two pairs) of 2, 3, 1, 2 tokens
    tlp = torch.tensor([-1.0, -2.0, -0.5, -0.5, -3.0, -1.5, -0.2, -0.7], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -1.0, -0.5, -2.0, -1.0, -0.4, -0.3], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    seg = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    s = sequence_scores(tlp, ref, w, seg, 4)
    want_s = [0.5 - 1.0, 0.0 + 0.0 - 2.0, -0.5, 0.2 - 0.2]
    assert s.tolist() == pytest.approx(want_s)
    beta, eps = 0.5, 0.1
    cfg = resolve_config("dpo", {"beta": beta, "label_smoothing": eps}, {})
    pair = dpo(s[0::2], s[1::2], cfg)

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    z = [beta * (want_s[0] - want_s[1]), beta * (want_s[2] - want_s[3])]  # 0.75, -0.25
    want = [-(1 - eps) * math.log(sig(zi)) - eps * math.log(sig(-zi)) for zi in z]
    assert pair.tolist() == pytest.approx(want)
    pair.sum().backward()
    ds = [
        beta * (sig(z[0]) - 1 + eps),
        -beta * (sig(z[0]) - 1 + eps),
        beta * (sig(z[1]) - 1 + eps),
        -beta * (sig(z[1]) - 1 + eps),
    ]
    assert tlp.grad.tolist() == pytest.approx([ds[int(seg[i])] * float(w[i]) for i in range(8)])


@pytest.mark.parametrize(
    "name, v2, match",
    [
        ("dpo", {"beta": 0.0}, "beta must be > 0"),
        ("dpo", {"label_smoothing": 0.5}, "label_smoothing"),
        ("dpo", {"label_smoothing": -0.1}, "label_smoothing"),
        ("dpo", {"beta": float("inf")}, "finite"),
        ("dpo", {"clip_low_threshold": 0.5}, "unknown loss_fn_config"),
        ("dppo", {"adv_tau": 0.0}, "adv_tau must be > 0"),
        ("dppo", {"dppo_mask_high": -0.1}, "dppo_mask_high must be >= 0"),
        ("dppo", {"dppo_mask_low": -1}, "dppo_mask_low"),
        ("dppo", {"kl_tau": -1e-3}, "kl_tau"),
        ("dppo", {"kl_tau": float("nan")}, "finite"),
        ("dppo", {"beta": 1.0}, "unknown loss_fn_config"),
    ],
)
def test_bad_configs(name, v2, match):
    with pytest.raises(UserError, match=match):
        resolve_config(name, v2, {})


def test_config_defaults():
    assert resolve_config("dpo", {}, {}) == {"beta": 0.1, "label_smoothing": 0.0}
    assert resolve_config("dppo", {}, {}) == {
        "dppo_mask_high": 0.2,
        "dppo_mask_low": 0.2,
        "adv_tau": 1.0,
        "kl_tau": 1e-3,
    }
    assert get_loss("dpo").kind == "pair" and get_loss("dppo").kind == "token"


def test_plan_microbatches_keeps_pairs_together():
    def p(n):
        return Prepared(np.zeros(n, np.int64), np.zeros(n, np.int64), {})

    data = [p(10), p(30), p(20), p(5), p(100), p(8), p(12), p(12)]
    groups = plan_microbatches(data, 60, pairs=True)
    assert sorted(i for g in groups for i in g) == list(range(8))
    for g in groups:
        assert len(g) % 2 == 0
        assert all(g[j] % 2 == 0 and g[j + 1] == g[j] + 1 for j in range(0, len(g), 2))  # (chosen, rejected)
        assert len(g) == 2 or len(g) * max(data[i].length for i in g) <= 60
    assert [4, 5] in groups  # over the budget: its own group
    # unpaired planning is unchanged
    assert plan_microbatches(data, 60) == plan_microbatches(data, 60, pairs=False)


# ---- through the engine ----------------------------------------------------------------


@pytest.fixture
def make_model(tiny_model, tmp_path):
    return lambda **kw: new_model(tiny_model, tmp_path / "store", **kw)


def _model_logprobs(m, d, with_grad: bool) -> torch.Tensor:
    targets = torch.as_tensor(np.where(d["target_tokens"] == -100, 0, d["target_tokens"]))
    with torch.set_grad_enabled(with_grad):
        logits = m.peft(input_ids=torch.as_tensor(d["tokens"])[None]).logits[0]
        return torch.log_softmax(logits.float(), -1)[torch.arange(len(targets)), targets]


def _pairs_data(seed: int, loops: bool) -> list[dict]:
    data = sft_batch(seed, n=4, length=20)
    rng = np.random.default_rng(seed)
    out = []
    for d in data:
        n = len(d["tokens"])
        x = {
            "tokens": d["tokens"],
            "target_tokens": d["target_tokens"].copy(),
            "ref_logprobs": rng.uniform(-9, -6, n).astype(np.float32),
        }
        if loops:
            x["target_tokens"][:3] = -100  # the prompt
            x["ref_logprobs"][:3] = np.nan  # nothing there: null from the SDK
        else:
            x["weights"] = d["weights"]  # prompt masked by weight 0
        out.append(x)
    return out


def _manual_dpo(m, data, beta, eps):
    """The DPO loss computed directly with autograd (sum over pairs), for comparison."""
    scores = []
    for d in data:
        lp = _model_logprobs(m, d, True)
        active = torch.as_tensor(d["target_tokens"] != -100)
        w = torch.as_tensor(d.get("weights", np.ones(len(lp), np.float32))) * active
        ref = torch.as_tensor(np.nan_to_num(d["ref_logprobs"]))
        scores.append((w * (lp - ref)).sum())
    s = torch.stack(scores)
    z = beta * (s[0::2] - s[1::2])
    return (-(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)), s


@pytest.mark.parametrize("microbatch_tokens", [4096, 40])
def test_dpo_tinker_dialect(make_model, microbatch_tokens):
    m = make_model(microbatch_tokens=microbatch_tokens)
    data = _pairs_data(0, loops=False)
    raw = m.forward_backward(fwd_request(data, loss_fn="dpo", config={"beta": 0.5, "label_smoothing": 0.1}))
    out = response_conv.deserialize_forward_backward_output(raw)
    assert all(set(o) == {"logprobs"} for o in out.loss_fn_outputs)
    got = grads(m)
    m.engine.clear_grads()
    pair, s = _manual_dpo(m, data, 0.5, 0.1)
    pair.sum().backward()
    s = s.detach()
    want = grads(m)
    assert out.metrics["loss:sum"] == pytest.approx(float(pair.detach().sum()), rel=1e-5)
    d = (s[0::2] - s[1::2]).detach()
    assert out.metrics["dpo_accuracy:mean"] == pytest.approx(float((d > 0).double().mean()))
    assert out.metrics["dpo_margin:mean"] == pytest.approx(float(0.5 * d.mean()), rel=1e-4)
    assert out.metrics["dpo_chosen_reward:mean"] == pytest.approx(float(0.5 * s[0::2].mean()), rel=1e-4)
    assert out.metrics["dpo_rejected_reward:mean"] == pytest.approx(float(0.5 * s[1::2].mean()), rel=1e-4)
    assert got.keys() == want.keys() and got
    for k in got:  # float32 sums in another order: compare at the scale of the whole gradient
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5)


def test_dpo_loops_dialect_mean_over_pairs(make_model):
    m = make_model(microbatch_tokens=40)
    data = _pairs_data(1, loops=True)
    out = loops_run(m, data, loss_fn="dpo")  # beta 0.1, no smoothing
    pair, s = _manual_dpo(make_model(), data, 0.1, 0.0)
    pair, s = pair.detach(), s.detach()
    assert out["loss"] == pytest.approx(float(pair.mean()), rel=1e-5)
    met = out["metrics"]
    assert met["num_pairs"] == 2.0 and met["skip_token_normalization"] == 0.0
    assert met["num_tokens"] == sum(int((d["target_tokens"] != -100).sum()) for d in data)
    assert {"dpo_accuracy", "dpo_margin", "dpo_chosen_reward", "dpo_rejected_reward"} <= set(met)
    assert met["dpo_margin"] == pytest.approx(float(0.1 * (s[0::2] - s[1::2]).mean()), rel=1e-4)
    for o in out["loss_fn_outputs"]:
        assert set(o) == {"logprobs"}
        lp = to_numpy(o["logprobs"])
        assert np.isnan(lp[:3]).all() and np.isfinite(lp[3:]).all()
    # gradients are the sum over pairs until optim_step divides by the pair count
    assert m.engine.accumulation == ("mean", 2)
    ref = make_model()
    pair_ref, _ = _manual_dpo(ref, data, 0.1, 0.0)
    pair_ref.mean().backward()
    step(m, grad_clip_norm=0.0)
    step(ref, grad_clip_norm=0.0)  # no engine call on ref: nothing to divide, its grads are the mean's
    p1, p2 = params(m), params(ref)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-6)


def test_dpo_needs_pairs_and_reference(make_model):
    m = make_model()
    data = _pairs_data(2, loops=False)
    with pytest.raises(UserError, match="odd number"):
        m.forward_backward(fwd_request(data[:3], loss_fn="dpo"))
    with pytest.raises(UserError, match="odd number"):
        loops_run(m, _pairs_data(2, loops=True)[:1], loss_fn="dpo")
    with pytest.raises(UserError, match="missing 'ref_logprobs'"):
        m.forward_backward(
            fwd_request([{k: v for k, v in d.items() if k != "ref_logprobs"} for d in data], loss_fn="dpo")
        )
    assert grads(m) == {}


def _rl_data(seed: int, loops: bool) -> list[dict]:
    out = []
    rng = np.random.default_rng(seed)
    for d in sft_batch(seed, n=2):
        n = len(d["tokens"])
        x = {
            "tokens": d["tokens"],
            "target_tokens": d["target_tokens"].copy(),
            "logprobs": rng.uniform(-8.5, -7.0, n).astype(np.float32),
            "advantages": rng.normal(size=n).astype(np.float32),
        }
        if loops:
            x["target_tokens"][:3] = -100
        out.append(x)
    return out


def _manual_dppo_el(m, data, cfg, with_grad):
    cfg = resolve_config("dppo", cfg, {})
    els = []
    for d in data:
        lp = _model_logprobs(m, d, with_grad)
        inputs = {"logprobs": torch.as_tensor(d["logprobs"]), "advantages": torch.as_tensor(d["advantages"])}
        el = dppo(lp, inputs, cfg)
        els.append(el[torch.as_tensor(d["target_tokens"] != -100)])
    return torch.cat(els)


def test_dppo_through_both_dialects(make_model):
    cfg = {"dppo_mask_high": 1e-4, "dppo_mask_low": 1e-4, "kl_tau": 0.05}  # tiny model: small probabilities
    tink = make_model()
    data = _rl_data(3, loops=False)
    out = response_conv.deserialize_forward_backward_output(
        tink.forward_backward(fwd_request(data, loss_fn="dppo", config=cfg))
    )
    want_el = _manual_dppo_el(make_model(), data, cfg, False)
    got_el = np.concatenate([o["elementwise_loss"].to_numpy() for o in out.loss_fn_outputs])
    np.testing.assert_allclose(got_el, want_el.numpy(), rtol=1e-4, atol=1e-6)
    assert out.metrics["loss:sum"] == pytest.approx(float(want_el.sum()), rel=1e-4)
    frac = out.metrics["dppo_masked_fraction:mean"]
    assert 0.0 < frac < 1.0  # the thresholds above mask some tokens, not all

    loops = make_model()
    ldata = _rl_data(3, loops=True)
    lout = loops_run(loops, ldata, loss_fn="dppo", config=cfg)
    got = grads(loops)
    loops.engine.clear_grads()
    el = _manual_dppo_el(loops, ldata, cfg, True)
    el.sum().backward()  # gradients accumulate as the sum
    want = grads(loops)
    assert lout["loss"] == pytest.approx(float(el.detach().mean()), rel=1e-4)
    assert lout["metrics"]["num_tokens"] == len(el)
    assert 0.0 <= lout["metrics"]["dppo_masked_fraction"] <= 1.0
    for o in lout["loss_fn_outputs"]:
        assert np.isnan(to_numpy(o["elementwise_loss"])[:3]).all()
    for k in got:  # float32 sums in another order: compare at the scale of the whole gradient
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5)
