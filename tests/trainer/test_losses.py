"""Every built-in loss against values computed by hand, plus config handling."""

from __future__ import annotations

import math

import pytest
import torch

from data_plane.trainer.errors import UserError
from data_plane.trainer.losses import LOSSES, get_loss, resolve_config, target_logprobs

TLP = [math.log(0.5), math.log(0.25), math.log(0.8)]  # learner logprobs
SLP = [math.log(0.4), math.log(0.5), math.log(0.5)]  # sampler logprobs -> ratios 1.25, 0.5, 1.6
ADV = [1.0, -2.0, 0.5]


def _run(name, config=None, extra=None, tlp=TLP):
    t = torch.tensor(tlp, dtype=torch.float64, requires_grad=True)
    inputs = {"logprobs": torch.tensor(SLP, dtype=torch.float64), "advantages": torch.tensor(ADV, dtype=torch.float64)}
    inputs.update(extra or {})
    cfg = resolve_config(name, config or {}, {})
    el = get_loss(name).fn(t, inputs, cfg)
    loss = el.sum()
    loss.backward()
    return el.detach().tolist(), loss.item(), t.grad.tolist()


def test_cross_entropy_with_negative_weights():
    t = torch.tensor(TLP, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)
    el = get_loss("cross_entropy").fn(t, {"weights": w}, {})
    el.sum().backward()
    assert el.tolist() == pytest.approx([-math.log(0.5), 0.0, 0.5 * math.log(0.8)])
    assert t.grad.tolist() == pytest.approx([-1.0, 0.0, 0.5])


def test_importance_sampling():
    el, loss, grad = _run("importance_sampling")
    r = [1.25, 0.5, 1.6]
    assert el == pytest.approx([-r[i] * ADV[i] for i in range(3)])
    assert loss == pytest.approx(-(1.25 * 1 + 0.5 * -2 + 1.6 * 0.5))
    assert grad == pytest.approx([-r[i] * ADV[i] for i in range(3)])  # d exp(x)/dx = exp(x)


def test_ppo_default_bounds():
    el, loss, grad = _run("ppo")
    # r=1.25,A=1: min(1.25, 1.2)=1.2 (clipped, no grad); r=0.5,A=-2: min(-1, -1.6)=-1.6 (clipped);
    # r=1.6,A=.5: min(.8, .6)=.6 (clipped)
    assert el == pytest.approx([-1.2, 1.6, -0.6])
    assert loss == pytest.approx(-0.2)
    assert grad == pytest.approx([0.0, 0.0, 0.0])


def test_ppo_custom_bounds_unclipped_gradient():
    el, _, grad = _run("ppo", {"clip_low_threshold": 0.4, "clip_high_threshold": 2.0})
    assert el == pytest.approx([-1.25, 1.0, -0.8])
    assert grad == pytest.approx([-1.25, 1.0, -0.8])


def test_ppo_per_token_thresholds_override_config():
    lo = torch.tensor([0.4, 0.4, 0.4], dtype=torch.float64)
    hi = torch.tensor([1.1, 2.0, 2.0], dtype=torch.float64)
    el, _, _ = _run("ppo", extra={"clip_low_threshold": lo, "clip_high_threshold": hi})
    assert el == pytest.approx([-1.1, 1.0, -0.8])


def test_cispo():
    el, _, grad = _run("cispo")
    clipped = [1.2, 0.8, 1.2]  # clip(r, 0.8, 1.2), stop-gradient
    assert el == pytest.approx([-clipped[i] * TLP[i] * ADV[i] for i in range(3)])
    assert grad == pytest.approx([-clipped[i] * ADV[i] for i in range(3)])


def test_dro():
    beta = 0.3
    el, _, grad = _run("dro", {"beta": beta})
    d = [TLP[i] - SLP[i] for i in range(3)]
    assert el == pytest.approx([-(TLP[i] * ADV[i] - 0.5 * beta * d[i] ** 2) for i in range(3)])
    assert grad == pytest.approx([-(ADV[i] - beta * d[i]) for i in range(3)])


def test_target_logprobs_1d_and_2d():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]])  # probs [.25,.75], [2/3,1/3]
    assert target_logprobs(logits, torch.tensor([1, 0])).tolist() == pytest.approx([math.log(0.75), math.log(2 / 3)])
    two = target_logprobs(logits, torch.tensor([[0, 1], [1, 1]]))
    assert two.shape == (2, 2)
    assert two.flatten().tolist() == pytest.approx([math.log(0.25), math.log(0.75)] + [math.log(1 / 3)] * 2)


def test_config_v2_wins_over_legacy():
    cfg = resolve_config("ppo", {"clip_low_threshold": 0.9}, {"clip_low_threshold": 0.5, "clip_high_threshold": 1.1})
    assert cfg == {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    assert resolve_config("ppo", {}, {}) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert resolve_config("cross_entropy", {}, {}) == {}


@pytest.mark.parametrize(
    "name, v2, match",
    [
        ("cross_entropy", {"beta": 1.0}, "unknown loss_fn_config"),
        ("ppo", {"epsilon": 0.2}, "unknown loss_fn_config"),
        ("ppo", {"clip_low_threshold": "x"}, "must be a number"),
        ("ppo", {"clip_low_threshold": float("nan")}, "finite"),
        ("ppo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}, "ratio bounds"),
        ("dro", {}, "needs loss_fn_config"),
        ("dro", {"beta": -1.0}, ">= 0"),
    ],
)
def test_bad_configs(name, v2, match):
    with pytest.raises(UserError, match=match):
        resolve_config(name, v2, {})


def test_unknown_and_unsupported_losses():
    with pytest.raises(UserError, match="unknown loss_fn"):
        get_loss("nope")
    with pytest.raises(UserError, match="not supported"):
        get_loss("gspo")
    assert set(LOSSES) == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "dppo", "dpo"}
