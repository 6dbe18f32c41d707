"""The built-in losses as pure torch functions, plus their input/config specifications.

**Token-level losses.** Each function maps the learner's ``target_logprobs`` (``tlp = log
p(target_tokens[i] | prefix)``) and the datum's loss inputs, already flattened over all tokens of
a micro-batch, to the *elementwise* loss. The Tinker dialect sums it (never averages); the Loops
dialect (see :mod:`data_plane.trainer.engine`) multiplies it by the token weights / ``-100``
mask first and reports the per-token mean.

| loss_fn | inputs | elementwise loss |
|---|---|---|
| cross_entropy | target_tokens, weights | ``-(tlp * w)`` (weights may be negative; 2-D [N, K] allowed) |
| importance_sampling | target_tokens, logprobs, advantages | ``-(r * A)``, ``r = exp(tlp - lp)`` |
| ppo | same | ``-min(r * A, clip(r, lo, hi) * A)`` |
| cispo | same | ``-(sg(clip(r, lo, hi)) * tlp * A)`` |
| dro | same | ``-(tlp * A - 0.5 * beta * (tlp - lp)^2)`` |
| dppo | same | ``-M * r * A' + kl_tau * (r - 1 - (tlp - lp))`` (see below) |

``lo``/``hi`` are the ratio bounds ``clip_low_threshold``/``clip_high_threshold`` (defaults 0.8 and
1.2) from ``loss_fn_config``, or per token from ``loss_fn_inputs`` of the same names when a datum
carries them. ``dro`` needs ``beta`` in ``loss_fn_config``. Extra ``loss_fn_inputs`` keys (e.g. a
``weights`` tensor next to RL inputs, or the cookbook's ``mask``) are ignored by the Tinker dialect.

``dppo`` (Divergence PPO with a binary total-variation trust region; our definition, the Loops
SDK only names its config fields). With ``mu = logprobs`` (the behaviour policy), ``r = exp(tlp -
mu)``, ``D = |exp(tlp) - exp(mu)|`` (the per-token probability shift) and ``A' = advantages /
adv_tau``, the mask ``M`` (computed without gradient) is 0 where ``A' > 0 and r > 1 and D >
dppo_mask_high`` or ``A' < 0 and r < 1 and D > dppo_mask_low``, else 1: tokens that already
moved too far in the direction the advantage pushes stop contributing the policy-gradient term.
The ``kl_tau`` term is the k3 estimator ``r - 1 - log r`` of the divergence from ``mu``. Config:
``dppo_mask_high`` 0.2, ``dppo_mask_low`` 0.2 (both >= 0), ``adv_tau`` 1.0 (> 0), ``kl_tau`` 1e-3
(>= 0). Metric ``dppo_masked_fraction``: the fraction of (active) tokens with ``M = 0``.

**Sequence-pair loss** ``dpo``. Datums come in pairs (even index = chosen, odd = rejected); inputs
``target_tokens``, ``ref_logprobs`` (the reference model's logprob of each target token) and an
optional ``weights`` mask. Per datum ``s = sum_t w_t * (tlp_t - ref_t)``; per pair ``d = s_chosen -
s_rejected`` and the loss is ``-(1 - eps) * log sigmoid(beta * d) - eps * log sigmoid(-beta * d)``
(``beta`` default 0.1, > 0; ``eps = label_smoothing`` default 0, in [0, 0.5)). Summed over pairs
(Tinker) or averaged over pairs (Loops). Metrics: ``dpo_accuracy`` (fraction of pairs with ``d >
0``), ``dpo_margin`` (mean ``beta * d``), ``dpo_chosen_reward`` / ``dpo_rejected_reward`` (mean
``beta * s``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

from data_plane.trainer.errors import UserError

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], Tensor]
PairLossFn = Callable[[Tensor, Tensor, Mapping[str, float]], Tensor]
StatsFn = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], dict[str, Tensor]]


def cross_entropy(tlp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    return -(tlp * inputs["weights"])


def _ratio(tlp: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    return torch.exp(tlp - inputs["logprobs"])


def _bounds(inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> tuple[Tensor | float, Tensor | float]:
    lo = inputs.get("clip_low_threshold", config["clip_low_threshold"])
    hi = inputs.get("clip_high_threshold", config["clip_high_threshold"])
    return lo, hi


def _clip(r: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        lo_t = lo if isinstance(lo, Tensor) else torch.full_like(r, lo)
        hi_t = hi if isinstance(hi, Tensor) else torch.full_like(r, hi)
        return torch.clamp(r, min=lo_t, max=hi_t)
    return torch.clamp(r, min=lo, max=hi)


def importance_sampling(tlp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    return -(_ratio(tlp, inputs) * inputs["advantages"])


def ppo(tlp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    r = _ratio(tlp, inputs)
    adv = inputs["advantages"]
    clipped = _clip(r, *_bounds(inputs, config))
    return -torch.minimum(r * adv, clipped * adv)


def cispo(tlp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    r = _ratio(tlp, inputs)
    clipped = _clip(r, *_bounds(inputs, config)).detach()
    return -(clipped * tlp * inputs["advantages"])


def dro(tlp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    quad = (tlp - inputs["logprobs"]) ** 2
    return -(tlp * inputs["advantages"] - 0.5 * config["beta"] * quad)


def dppo_keep_mask(tlp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    """DPPO's trust-region mask ``M`` (1 = keep the policy-gradient term), without gradient."""
    with torch.no_grad():
        lp, mu = tlp.detach(), inputs["logprobs"]
        r = torch.exp(lp - mu)
        shift = (torch.exp(lp) - torch.exp(mu)).abs()
        adv = inputs["advantages"]  # adv_tau > 0: A' has the sign of the advantage
        up = (adv > 0) & (r > 1) & (shift > config["dppo_mask_high"])
        down = (adv < 0) & (r < 1) & (shift > config["dppo_mask_low"])
        return (~(up | down)).to(tlp.dtype)


def dppo(tlp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> Tensor:
    log_ratio = tlp - inputs["logprobs"]
    r = torch.exp(log_ratio)
    adv = inputs["advantages"] / config["adv_tau"]
    keep = dppo_keep_mask(tlp, inputs, config)
    return -(keep * r * adv) + config["kl_tau"] * (r - 1.0 - log_ratio)


def dppo_stats(tlp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]) -> dict[str, Tensor]:
    return {"dppo_masked_fraction": 1.0 - dppo_keep_mask(tlp, inputs, config)}


def sequence_scores(tlp: Tensor, ref: Tensor, weights: Tensor | None, segments: Tensor, n: int) -> Tensor:
    """DPO's per-datum ``s = sum_t w_t * (tlp_t - ref_t)`` for flattened tokens whose datum index
    (``0 <= segments < n``) is given per token (no weights: all 1)."""
    contrib = tlp - ref if weights is None else weights * (tlp - ref)
    return torch.zeros(n, dtype=contrib.dtype, device=contrib.device).index_add(0, segments, contrib)


def dpo(chosen: Tensor, rejected: Tensor, config: Mapping[str, float]) -> Tensor:
    """Per-pair DPO loss from the chosen / rejected sequence scores ``s``."""
    z = config["beta"] * (chosen - rejected)
    eps = config["label_smoothing"]
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def dpo_stats(chosen: Tensor, rejected: Tensor, config: Mapping[str, float]) -> dict[str, float]:
    """Sums over the pairs (the caller divides by the pair count) of the DPO metrics."""
    beta = config["beta"]
    with torch.no_grad():
        c, r = chosen.detach().double(), rejected.detach().double()
        return {
            "dpo_accuracy": float((c > r).sum()),
            "dpo_margin": float((beta * (c - r)).sum()),
            "dpo_chosen_reward": float((beta * c).sum()),
            "dpo_rejected_reward": float((beta * r).sum()),
        }


def _check_clip(out: Mapping[str, float]) -> None:
    lo, hi = out["clip_low_threshold"], out["clip_high_threshold"]
    if not 0.0 <= lo <= hi:
        raise UserError(
            f"clip thresholds are ratio bounds and need 0 <= clip_low_threshold <= clip_high_threshold "
            f"(e.g. 0.8 and 1.2), got {lo} and {hi}"
        )


def _check_dro(out: Mapping[str, float]) -> None:
    if out["beta"] < 0:
        raise UserError(f"dro beta must be >= 0, got {out['beta']}")


def _check_dpo(out: Mapping[str, float]) -> None:
    if not out["beta"] > 0:
        raise UserError(f"dpo beta must be > 0, got {out['beta']}")
    if not 0.0 <= out["label_smoothing"] < 0.5:
        raise UserError(f"dpo label_smoothing must be in [0, 0.5), got {out['label_smoothing']}")


def _check_dppo(out: Mapping[str, float]) -> None:
    for key in ("dppo_mask_high", "dppo_mask_low", "kl_tau"):
        if out[key] < 0:
            raise UserError(f"dppo {key} must be >= 0, got {out[key]}")
    if not out["adv_tau"] > 0:
        raise UserError(f"dppo adv_tau must be > 0, got {out['adv_tau']}")


@dataclass(frozen=True, slots=True)
class LossSpec:
    fn: LossFn | PairLossFn  # PairLossFn when kind == "pair"
    required: tuple[str, ...]  # loss_fn_inputs besides target_tokens (float32, shape of target_tokens)
    optional: tuple[str, ...] = ()  # float [N] inputs used when present (else the config value)
    config: Mapping[str, float | None] = field(default_factory=dict)  # key -> default (None: required)
    allow_2d: bool = False  # [N, K] target_tokens / inputs
    kind: str = "token"  # "token": elementwise loss | "pair": dpo-style (chosen, rejected) datum pairs
    optional_weights: bool = False  # Tinker dialect: an optional `weights` mask shaped like target_tokens
    check: Callable[[Mapping[str, float]], None] | None = None  # extra config validation
    stats: StatsFn | None = None  # per-token metrics, averaged over (active) tokens

    @property
    def token_loss(self) -> LossFn:
        if self.kind != "token":
            raise TypeError("a pair loss has no elementwise form")
        return cast("LossFn", self.fn)

    @property
    def pair_loss(self) -> PairLossFn:
        if self.kind != "pair":
            raise TypeError("an elementwise loss has no pair form")
        return cast("PairLossFn", self.fn)


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_RL = ("logprobs", "advantages")
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("weights",), config={}, allow_2d=True),
    "importance_sampling": LossSpec(importance_sampling, _RL, config={}),
    "ppo": LossSpec(ppo, _RL, _CLIP_INPUTS, config=_CLIP, check=_check_clip),
    "cispo": LossSpec(cispo, _RL, _CLIP_INPUTS, config=_CLIP, check=_check_clip),
    "dro": LossSpec(dro, _RL, config={"beta": None}, check=_check_dro),
    "dppo": LossSpec(
        dppo,
        _RL,
        config={"dppo_mask_high": 0.2, "dppo_mask_low": 0.2, "adv_tau": 1.0, "kl_tau": 1e-3},
        check=_check_dppo,
        stats=dppo_stats,
    ),
    "dpo": LossSpec(
        dpo,
        ("ref_logprobs",),
        config={"beta": 0.1, "label_smoothing": 0.0},
        kind="pair",
        optional_weights=True,
        check=_check_dpo,
    ),
}
UNSUPPORTED = {"gspo", "stable_reinforce", "custom"}


def get_loss(name: str) -> LossSpec:
    if name in LOSSES:
        return LOSSES[name]
    if name in UNSUPPORTED:
        raise UserError(f"loss_fn {name!r} is not supported by this server; supported: {sorted(LOSSES)}")
    raise UserError(f"unknown loss_fn {name!r}; supported: {sorted(LOSSES)}")


def resolve_config(
    name: str,
    v2: Mapping[str, float | str],
    legacy: Mapping[str, float],
) -> dict[str, float]:
    """Merge ``loss_fn_config_v2`` (preferred) and the legacy numeric map, apply defaults and
    validate. Unknown keys, text values, missing required keys and non-finite or out-of-range
    values raise :class:`UserError`."""
    spec = get_loss(name)
    merged: dict[str, float | str] = dict(legacy)
    merged.update(v2)
    allowed = dict(spec.config)
    unknown = sorted(set(merged) - set(allowed))
    if unknown:
        hint = f"; it accepts {sorted(allowed)}" if allowed else "; it takes no loss_fn_config"
        raise UserError(f"unknown loss_fn_config key(s) {unknown} for loss_fn {name!r}{hint}")
    out: dict[str, float] = {}
    for key, default in allowed.items():
        if key in merged:
            value = merged[key]
            if isinstance(value, str):
                raise UserError(f"loss_fn_config[{key!r}] must be a number, got text {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"loss_fn_config[{key!r}] must be finite, got {value}")
            out[key] = value
        elif default is None:
            raise UserError(f"loss_fn {name!r} needs loss_fn_config[{key!r}]")
        else:
            out[key] = default
    if spec.check is not None:
        spec.check(out)
    return out


def target_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log_softmax(logits)[..., targets]`` for ``logits [..., V]`` and ``targets [...]`` or
    ``[..., K]`` (returns the shape of ``targets``), in float32, without materialising the full
    log-softmax."""
    return target_logprobs_and_lse(logits, targets)[0]


def target_logprobs_and_lse(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`target_logprobs` plus the float32 ``logsumexp(logits, -1, keepdim=True)`` it used
    (what :func:`top_k_logprobs` needs)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    if targets.dim() == logits.dim():  # [..., K]
        return logits.gather(-1, targets) - lse, lse
    return (logits.gather(-1, targets.unsqueeze(-1)) - lse).squeeze(-1), lse


def top_k_logprobs(logits: Tensor, lse: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most likely next tokens at each position: (logprobs float32 ``[..., k]``, ids
    int64 ``[..., k]``), from the raw logits (top-k of the logits is top-k of the log-softmax) and
    their ``lse``, without building a log-softmax over the vocabulary. No gradient."""
    with torch.no_grad():
        values, ids = torch.topk(logits.detach(), k, dim=-1)
        return values.float() - lse.detach(), ids
