"""Training requests, validated and planned before anything runs on the model.

:func:`prepare` (Tinker) and :func:`prepare_loops` (Loops) turn a ``ForwardBackwardRequest``
into a :class:`Batch` of :class:`Prepared` datums — token ids, targets and loss inputs as
arrays, every shape, id, value and loss option checked, with a :class:`UserError` naming the
datum and field otherwise — and :func:`plan_microbatches` groups the datums under a
padded-token budget. The dialects' conventions are described in :mod:`data_plane.trainer.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from data_plane.trainer.errors import UserError
from data_plane.trainer.losses import LossSpec, get_loss, resolve_config
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.tensors import TensorDecodeError, decode_model_input, decode_tensor

IGNORE_INDEX = -100  # Loops dialect: a target that contributes nothing
MAX_TOP_K = 20
TOP_K_OPTION = "top_k_logprobs"
SKIP_NORM_OPTION = "skip_token_normalization"


@dataclass(slots=True)
class Prepared:
    tokens: np.ndarray  # int64 [N]
    targets: np.ndarray  # int64 [N] or [N, K] (valid ids: -100 already replaced by a safe id)
    inputs: dict[str, np.ndarray]  # float32, shaped like targets (or [N] for clip thresholds)
    active: np.ndarray | None = None  # Loops: bool, shaped like targets; None: every position counts
    scale: np.ndarray | None = None  # float32 like targets: multiplies the elementwise loss (dpo: the w_t)
    # Loops: bool like targets, the positions with a target (not -100): outputs are NaN
    # elsewhere. Wider than ``active``: a zero weight counts nothing but is still scored (the
    # SDK's forward_backward_custom reads logprobs with all-zero weights)
    scored: np.ndarray | None = None

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def k(self) -> int:
        return 0 if self.targets.ndim == 1 else int(self.targets.shape[1])

    @property
    def active_rows(self) -> np.ndarray:
        """bool [N]: positions with at least one active target."""
        if self.active is None:
            return np.ones(self.length, dtype=bool)
        return self.active if self.active.ndim == 1 else np.asarray(self.active.any(axis=1))

    @property
    def num_active(self) -> int:
        return int(self.active_rows.sum())


@dataclass(slots=True)
class Batch:
    loss_fn: str
    spec: LossSpec
    config: dict[str, float]
    data: list[Prepared]
    forward_only: bool
    loops: bool = False  # the Loops dialect (masked outputs, plain metric names)
    normalize: bool = False  # Loops: mean over active tokens (dpo: pairs) instead of the sum
    top_k: int = 0  # Loops: top-k next-token logprobs per position

    @property
    def pairs(self) -> bool:
        return self.spec.kind == "pair"

    def norm_count(self) -> int:
        """What a normalized loss is divided by: active tokens, or pairs for dpo."""
        return len(self.data) // 2 if self.pairs else sum(d.num_active for d in self.data)


def _config_maps(req: pb.ForwardBackwardRequest) -> tuple[dict[str, float | str], dict[str, float]]:
    v2: dict[str, float | str] = {}
    for k, v in req.loss_fn_config_v2.items():
        which = v.WhichOneof("value")
        if which == "number":
            v2[k] = v.number
        elif which == "text":
            v2[k] = v.text
        else:
            raise UserError(f"loss_fn_config_v2[{k!r}] has no value")
    return v2, dict(req.loss_fn_config)


def prepare(req: pb.ForwardBackwardRequest, vocab_size: int, max_seq_len: int) -> Batch:
    """Decode and validate a whole Tinker-dialect request; raises :class:`UserError` on any bad
    input."""
    spec = get_loss(req.loss_fn)
    v2, legacy = _config_maps(req)
    config = resolve_config(req.loss_fn, v2, legacy)
    data = [_prepare_datum(i, d, spec, vocab_size, max_seq_len) for i, d in enumerate(req.data)]
    _check_pairs(spec, req.loss_fn, data)
    return Batch(req.loss_fn, spec, config, data, bool(req.forward_only))


def prepare_loops(req: pb.ForwardBackwardRequest, vocab_size: int, max_seq_len: int) -> Batch:
    """Decode and validate a whole Loops-dialect request (see the module docstring). The options
    ``top_k_logprobs`` (integer 0..20) and ``skip_token_normalization`` (0 or 1) are taken out of
    the loss config before it is validated."""
    spec = get_loss(req.loss_fn)
    v2, legacy = _config_maps(req)
    top_k = _pop_option(TOP_K_OPTION, v2, legacy, range(MAX_TOP_K + 1))
    skip = _pop_option(SKIP_NORM_OPTION, v2, legacy, range(2))
    if top_k > vocab_size:
        raise UserError(f"{TOP_K_OPTION}={top_k} exceeds the vocabulary size {vocab_size}")
    config = resolve_config(req.loss_fn, v2, legacy)
    data = [_prepare_loops_datum(i, d, spec, config, vocab_size, max_seq_len) for i, d in enumerate(req.data)]
    _check_pairs(spec, req.loss_fn, data)
    return Batch(req.loss_fn, spec, config, data, bool(req.forward_only), loops=True, normalize=not skip, top_k=top_k)


def _pop_option(key: str, v2: dict, legacy: dict, allowed: range) -> int:
    """Remove an option from both config maps (v2 wins); default 0."""
    value = legacy.pop(key, 0)
    value = v2.pop(key, value)
    if isinstance(value, str) or not math.isfinite(value) or value != int(value) or int(value) not in allowed:
        raise UserError(f"{key} must be an integer in [{allowed.start}, {allowed.stop - 1}], got {value!r}")
    return int(value)


def _check_pairs(spec: LossSpec, name: str, data: list[Prepared]) -> None:
    if spec.kind == "pair" and len(data) % 2:
        raise UserError(
            f"{name} takes datums in (chosen, rejected) pairs (even index chosen, odd index rejected); "
            f"got an odd number of datums ({len(data)})"
        )


def _decode_model_input(where: str, d: pb.Datum, vocab: int, max_seq_len: int) -> np.ndarray:
    try:
        tokens = decode_model_input(d.model_input)
    except TensorDecodeError as exc:
        raise UserError(f"{where}.model_input: {exc}") from None
    n = tokens.shape[0]
    if n == 0:
        raise UserError(f"{where}.model_input is empty")
    if n > max_seq_len:
        raise UserError(f"{where}: sequence of {n} tokens exceeds this model's max_seq_len {max_seq_len}")
    _check_vocab(tokens, vocab, f"{where}.model_input")
    return tokens


Getter = Callable[[str], np.ndarray]  # a datum's loss_fn_inputs[name], decoded


def _getter(where: str, d: pb.Datum) -> Getter:
    def get(name: str) -> np.ndarray:
        try:
            return decode_tensor(d.loss_fn_inputs[name], f"{where}.loss_fn_inputs[{name!r}]")
        except TensorDecodeError as exc:
            raise UserError(str(exc)) from None

    return get


def _decode_targets(where: str, d: pb.Datum, get: Getter, spec: LossSpec, n: int) -> np.ndarray:
    if "target_tokens" not in d.loss_fn_inputs:
        raise UserError(f"{where}.loss_fn_inputs is missing 'target_tokens'")
    targets = get("target_tokens")
    if targets.dtype.kind == "f":
        if not np.all(np.isfinite(targets)) or np.any(targets != np.round(targets)):
            raise UserError(f"{where}.loss_fn_inputs['target_tokens'] must hold integer token ids")
        targets = targets.astype(np.int64)
    if targets.ndim == 2 and not spec.allow_2d:
        raise UserError(f"{where}: 2-D target_tokens are only supported by cross_entropy")
    if targets.ndim not in (1, 2) or targets.shape[0] != n or (targets.ndim == 2 and targets.shape[1] == 0):
        raise UserError(
            f"{where}.loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
            f"expected [{n}]{' or [' + str(n) + ', K]' if spec.allow_2d else ''} (the model_input length)"
        )
    return targets


def _like_targets(get: Getter, where: str, name: str, targets: np.ndarray) -> np.ndarray:
    arr = get(name).astype(np.float32, copy=False)
    if arr.shape != targets.shape:
        raise UserError(
            f"{where}.loss_fn_inputs[{name!r}] has shape {list(arr.shape)}, "
            f"expected {list(targets.shape)} (like target_tokens)"
        )
    return arr


def _check_clip_inputs(where: str, inputs: dict[str, np.ndarray]) -> None:
    if "clip_low_threshold" in inputs or "clip_high_threshold" in inputs:
        lo, hi = inputs.get("clip_low_threshold"), inputs.get("clip_high_threshold")
        if (lo is not None and np.any(lo < 0)) or (lo is not None and hi is not None and np.any(lo > hi)):
            raise UserError(f"{where}: per-token clip thresholds need 0 <= low <= high")


def _prepare_datum(i: int, d: pb.Datum, spec: LossSpec, vocab: int, max_seq_len: int) -> Prepared:
    where = f"data[{i}]"
    tokens = _decode_model_input(where, d, vocab, max_seq_len)
    n = tokens.shape[0]
    get = _getter(where, d)
    targets = _decode_targets(where, d, get, spec, n)
    _check_vocab(targets, vocab, f"{where}.loss_fn_inputs['target_tokens']")

    inputs: dict[str, np.ndarray] = {}
    for name in spec.required:
        if name not in d.loss_fn_inputs:
            raise UserError(f"{where}.loss_fn_inputs is missing {name!r} (needed by this loss_fn)")
        inputs[name] = _finite(_like_targets(get, where, name, targets), f"{where}.loss_fn_inputs[{name!r}]")
    for name in spec.optional:
        if name in d.loss_fn_inputs:
            arr = get(name).astype(np.float32, copy=False)
            if arr.shape != (n,):
                raise UserError(f"{where}.loss_fn_inputs[{name!r}] has shape {list(arr.shape)}, expected [{n}]")
            inputs[name] = _finite(arr, f"{where}.loss_fn_inputs[{name!r}]")
    _check_clip_inputs(where, inputs)
    scale = None
    if spec.optional_weights:  # dpo: an optional weights mask, 1 by default
        if "weights" in d.loss_fn_inputs:
            scale = _finite(_like_targets(get, where, "weights", targets), f"{where}.loss_fn_inputs['weights']")
        else:
            scale = np.ones(targets.shape, dtype=np.float32)
    return Prepared(tokens, targets, inputs, scale=scale)


def _prepare_loops_datum(
    i: int, d: pb.Datum, spec: LossSpec, config: dict[str, float], vocab: int, max_seq_len: int
) -> Prepared:
    where = f"data[{i}]"
    tokens = _decode_model_input(where, d, vocab, max_seq_len)
    n = tokens.shape[0]
    get = _getter(where, d)
    targets = _decode_targets(where, d, get, spec, n)
    ignored = targets == IGNORE_INDEX
    _check_vocab(targets[~ignored], vocab, f"{where}.loss_fn_inputs['target_tokens'] (-100 = ignore)")
    safe_targets = np.where(ignored, 0, targets)

    if "weights" in d.loss_fn_inputs:
        w = np.where(ignored, np.float32(0), _like_targets(get, where, "weights", targets)).astype(np.float32)
        weights = _finite(w, f"{where}.loss_fn_inputs['weights']")
        active = ~ignored & (weights != 0)
    else:
        weights = (~ignored).astype(np.float32)
        active = ~ignored

    inputs: dict[str, np.ndarray] = {}
    for name in spec.required:
        if name == "weights":
            inputs[name] = weights
            continue
        if name not in d.loss_fn_inputs:
            raise UserError(f"{where}.loss_fn_inputs is missing {name!r} (needed by this loss_fn)")
        # inactive positions get a neutral 0 (they may hold anything, e.g. NaN for "no value")
        arr = np.where(active, _like_targets(get, where, name, targets), np.float32(0)).astype(np.float32)
        inputs[name] = _finite(arr, f"{where}.loss_fn_inputs[{name!r}]")
    for name in spec.optional:
        if name in d.loss_fn_inputs:
            arr = get(name).astype(np.float32, copy=False)
            if arr.shape != (n,):
                raise UserError(f"{where}.loss_fn_inputs[{name!r}] has shape {list(arr.shape)}, expected [{n}]")
            arr = np.where(active, arr, np.float32(config[name])).astype(np.float32)
            inputs[name] = _finite(arr, f"{where}.loss_fn_inputs[{name!r}]")
    _check_clip_inputs(where, inputs)
    # cross_entropy already multiplies by its weights input; every other loss is scaled here
    scale = None if "weights" in spec.required else weights
    return Prepared(tokens, safe_targets, inputs, active=active, scale=scale, scored=~ignored)


def _check_vocab(ids: np.ndarray, vocab: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise UserError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab})")


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{what} contains NaN or infinite values")
    return arr


def units(data: Sequence[Prepared], pairs: bool = False) -> list[list[int]]:
    """The datum indices that must stay together (a ``dpo`` pair ``(2p, 2p + 1)``, else one
    datum), ordered by target width K, then longest first, then position."""
    size = 2 if pairs else 1
    out = [list(range(j, min(j + size, len(data)))) for j in range(0, len(data), size)]
    out.sort(key=lambda u: (data[u[0]].k, -max(data[i].length for i in u), u[0]))
    return out


def plan_microbatches(data: Sequence[Prepared], budget_tokens: int, pairs: bool = False) -> list[list[int]]:
    """Group datum indices: same target width K, sorted by length (longest first), each group
    with ``len(group) * longest <= budget_tokens`` (a longer single datum forms its own group).

    With ``pairs``, datums ``(2p, 2p + 1)`` are one unit (length: the longer of the two) that is
    never split, listed in that order inside its group; a pair over the budget forms its own group.
    """
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for u in units(data, pairs):
        n = max(data[i].length for i in u)
        if cur and (data[cur[0]].k != data[u[0]].k or (len(cur) + len(u)) * max(cur_max, n) > budget_tokens):
            groups.append(cur)
            cur, cur_max = [], 0
        cur.extend(u)
        cur_max = max(cur_max, n)
    if cur:
        groups.append(cur)
    return groups
