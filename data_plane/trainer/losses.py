"""The built-in Tinker losses as pure torch functions, plus their input/config specifications.

Every loss is token-level and **summed** (never averaged). Each function maps the learner's
``target_logprobs`` (``log p(target_tokens[i] | prefix)``) and the datum's loss inputs, already
flattened over all tokens of a micro-batch, to the *elementwise* loss; the loss is its sum.

| loss_fn | inputs | elementwise loss |
|---|---|---|
| cross_entropy | target_tokens, weights | ``-(tlp * w)`` (weights may be negative; 2-D [N, K] allowed) |
| importance_sampling | target_tokens, logprobs, advantages | ``-(r * A)``, ``r = exp(tlp - lp)`` |
| ppo | same | ``-min(r * A, clip(r, lo, hi) * A)`` |
| cispo | same | ``-(sg(clip(r, lo, hi)) * tlp * A)`` |
| dro | same | ``-(tlp * A - 0.5 * beta * (tlp - lp)^2)`` |

``lo``/``hi`` are the ratio bounds ``clip_low_threshold``/``clip_high_threshold`` (defaults 0.8 and
1.2) from ``loss_fn_config``, or per token from ``loss_fn_inputs`` of the same names when a datum
carries them. ``dro`` needs ``beta`` in ``loss_fn_config``. Extra ``loss_fn_inputs`` keys (e.g. a
``weights`` tensor next to RL inputs, or the cookbook's ``mask``) are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from data_plane.trainer.errors import UserError

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], Tensor]


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


@dataclass(frozen=True, slots=True)
class LossSpec:
    fn: LossFn
    required: tuple[str, ...]  # loss_fn_inputs besides target_tokens (float32, shape of target_tokens)
    optional: tuple[str, ...] = ()  # float inputs used when present
    config: Mapping[str, float | None] = None  # key -> default (None: required)
    allow_2d: bool = False  # [N, K] target_tokens / inputs


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_RL = ("logprobs", "advantages")
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("weights",), config={}, allow_2d=True),
    "importance_sampling": LossSpec(importance_sampling, _RL, config={}),
    "ppo": LossSpec(ppo, _RL, _CLIP_INPUTS, config=_CLIP),
    "cispo": LossSpec(cispo, _RL, _CLIP_INPUTS, config=_CLIP),
    "dro": LossSpec(dro, _RL, config={"beta": None}),
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
    allowed = dict(spec.config or {})
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
    if "clip_low_threshold" in out:
        lo, hi = out["clip_low_threshold"], out["clip_high_threshold"]
        if not 0.0 <= lo <= hi:
            raise UserError(
                f"clip thresholds are ratio bounds and need 0 <= clip_low_threshold <= clip_high_threshold "
                f"(e.g. 0.8 and 1.2), got {lo} and {hi}"
            )
    if "beta" in out and out["beta"] < 0:
        raise UserError(f"dro beta must be >= 0, got {out['beta']}")
    return out


def target_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log_softmax(logits)[..., targets]`` for ``logits [..., V]`` and ``targets [...]`` or
    ``[..., K]`` (returns the shape of ``targets``), in float32, without materialising the full
    log-softmax."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    if targets.dim() == logits.dim():  # [..., K]
        return logits.gather(-1, targets) - lse
    return (logits.gather(-1, targets.unsqueeze(-1)) - lse).squeeze(-1)
