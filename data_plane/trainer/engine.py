"""The training engine of one LoRA model: forward/backward with gradient accumulation,
forward-only evaluation, and AdamW steps.

- ``forward_backward`` adds the gradient of the summed loss to ``.grad`` (accumulating across
  calls until the next ``optim_step``); ``forward_only`` runs under ``no_grad`` and touches no
  gradients.
- Datums are grouped into micro-batches under a padded-token budget (``B * max_len <=
  microbatch_tokens``; a longer datum runs alone), sorted by length to limit padding. Padding
  is on the right, so causal attention never sees it and no attention mask is needed.
- Every input is validated (:func:`prepare`) before anything runs; a non-finite loss aborts
  the call and restores the gradients to what they were before it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_plane.trainer.errors import UserError
from data_plane.trainer.losses import LossSpec, get_loss, resolve_config, target_logprobs
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.op_bodies import AdamSpec
from data_plane.wire.tensors import TensorDecodeError, decode_model_input, decode_tensor


@dataclass(slots=True)
class Prepared:
    tokens: np.ndarray  # int64 [N]
    targets: np.ndarray  # int64 [N] or [N, K]
    inputs: dict[str, np.ndarray]  # float32, shaped like targets (or [N] for clip thresholds)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def k(self) -> int:
        return 0 if self.targets.ndim == 1 else int(self.targets.shape[1])


@dataclass(slots=True)
class Batch:
    loss_fn: str
    spec: LossSpec
    config: dict[str, float]
    data: list[Prepared]
    forward_only: bool


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
    """Decode and validate a whole request; raises :class:`UserError` on any bad input."""
    spec = get_loss(req.loss_fn)
    v2, legacy = _config_maps(req)
    config = resolve_config(req.loss_fn, v2, legacy)
    data = [_prepare_datum(i, d, spec, vocab_size, max_seq_len) for i, d in enumerate(req.data)]
    return Batch(req.loss_fn, spec, config, data, bool(req.forward_only))


def _prepare_datum(i: int, d: pb.Datum, spec: LossSpec, vocab: int, max_seq_len: int) -> Prepared:
    where = f"data[{i}]"
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

    def get(name: str) -> np.ndarray:
        try:
            return decode_tensor(d.loss_fn_inputs[name], f"{where}.loss_fn_inputs[{name!r}]")
        except TensorDecodeError as exc:
            raise UserError(str(exc)) from None

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
    _check_vocab(targets, vocab, f"{where}.loss_fn_inputs['target_tokens']")

    inputs: dict[str, np.ndarray] = {}
    for name in spec.required:
        if name not in d.loss_fn_inputs:
            raise UserError(f"{where}.loss_fn_inputs is missing {name!r} (needed by this loss_fn)")
        arr = get(name).astype(np.float32, copy=False)
        if arr.shape != targets.shape:
            raise UserError(
                f"{where}.loss_fn_inputs[{name!r}] has shape {list(arr.shape)}, "
                f"expected {list(targets.shape)} (like target_tokens)"
            )
        inputs[name] = _finite(arr, f"{where}.loss_fn_inputs[{name!r}]")
    for name in spec.optional:
        if name in d.loss_fn_inputs:
            arr = get(name).astype(np.float32, copy=False)
            if arr.shape != (n,):
                raise UserError(f"{where}.loss_fn_inputs[{name!r}] has shape {list(arr.shape)}, expected [{n}]")
            inputs[name] = _finite(arr, f"{where}.loss_fn_inputs[{name!r}]")
    if "clip_low_threshold" in inputs or "clip_high_threshold" in inputs:
        lo, hi = inputs.get("clip_low_threshold"), inputs.get("clip_high_threshold")
        if (lo is not None and np.any(lo < 0)) or (lo is not None and hi is not None and np.any(lo > hi)):
            raise UserError(f"{where}: per-token clip thresholds need 0 <= low <= high")
    return Prepared(tokens, targets, inputs)


def _check_vocab(ids: np.ndarray, vocab: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise UserError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab})")


def _finite(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{what} contains NaN or infinite values")
    return arr


def plan_microbatches(data: Sequence[Prepared], budget_tokens: int) -> list[list[int]]:
    """Group datum indices: same target width K, sorted by length (longest first), each group
    with ``len(group) * longest <= budget_tokens`` (a longer single datum forms its own group)."""
    order = sorted(range(len(data)), key=lambda i: (data[i].k, -data[i].length, i))
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        d = data[i]
        if cur and (data[cur[0]].k != d.k or (len(cur) + 1) * max(cur_max, d.length) > budget_tokens):
            groups.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, d.length)
    if cur:
        groups.append(cur)
    return groups


@dataclass(slots=True)
class FwdBwdResult:
    per_datum: list[dict[str, np.ndarray]]  # logprobs, elementwise_loss (shape of target_tokens)
    metrics: dict[str, float]


class NonFiniteLoss(UserError):
    pass


def _split_head(model):
    """(decoder, lm_head) when logits are exactly ``lm_head(decoder(x))`` (Llama/Qwen-style
    models without logit scaling or soft-capping), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    if type(base).__name__ not in _PLAIN_HEAD_ARCHS:
        return None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


_PLAIN_HEAD_ARCHS = {
    "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
    "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Phi3ForCausalLM",
}


class Engine:
    def __init__(self, model, device: torch.device, microbatch_tokens: int) -> None:
        self.model = model
        self.device = device
        self.microbatch_tokens = max(1, int(microbatch_tokens))
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.optimizer = self.new_optimizer()
        self.optimizer_steps = 0  # how many optim_steps these weights have taken
        self._split_head = _split_head(model)

    def new_optimizer(self) -> torch.optim.AdamW:
        d = AdamSpec()
        return torch.optim.AdamW(
            self.params, lr=d.learning_rate, betas=(d.beta1, d.beta2), eps=d.eps, weight_decay=d.weight_decay,
            foreach=True,
        )

    def reset_optimizer(self) -> None:
        self.optimizer = self.new_optimizer()

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    # ---- forward / backward -------------------------------------------------------------
    def forward_backward(self, batch: Batch) -> FwdBwdResult:
        per_datum: list[dict[str, np.ndarray] | None] = [None] * len(batch.data)
        total = 0.0
        snapshot = None if batch.forward_only else [None if p.grad is None else p.grad.clone() for p in self.params]
        try:
            for group in plan_microbatches(batch.data, self.microbatch_tokens):
                total += self._run_group(batch, group, per_datum)
        except BaseException:
            if snapshot is not None:
                for p, g in zip(self.params, snapshot, strict=True):
                    p.grad = g
            raise
        n_tokens = sum(d.length for d in batch.data)
        metrics = {"loss:sum": total, "num_tokens:sum": float(n_tokens)}
        return FwdBwdResult([d for d in per_datum if d is not None], metrics)

    def _run_group(self, batch: Batch, group: list[int], out: list) -> float:
        data = [batch.data[i] for i in group]
        lengths = [d.length for d in data]
        t_max = max(lengths)
        ids = np.zeros((len(data), t_max), dtype=np.int64)
        for row, d in enumerate(data):
            ids[row, : d.length] = d.tokens
        ids_t = torch.from_numpy(ids).to(self.device, non_blocking=True)
        mask = torch.from_numpy(np.arange(t_max)[None, :] < np.asarray(lengths)[:, None]).to(self.device)
        targets = torch.from_numpy(np.concatenate([d.targets for d in data])).to(self.device)
        inputs = self._flat_inputs(batch, data)

        with torch.set_grad_enabled(not batch.forward_only):
            flat_logits = self._logits(ids_t, mask)  # [M, V], rows in datum order
            tlp = target_logprobs(flat_logits, targets)
            elementwise = batch.spec.fn(tlp, inputs, batch.config)
            loss = elementwise.sum()
        loss_value = float(loss.detach().item())
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f"the {batch.loss_fn} loss is not finite ({loss_value}); check logprobs/advantages "
                "(e.g. sampler logprobs far below the model's make exp(ratio) overflow)"
            )
        if not batch.forward_only:
            loss.backward()
        lp = tlp.detach().float().cpu().numpy()
        el = elementwise.detach().float().cpu().numpy()
        start = 0
        for i, d in zip(group, data, strict=True):
            end = start + d.length
            out[i] = {"logprobs": lp[start:end], "elementwise_loss": el[start:end]}
            start = end
        return loss_value

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of the unpadded positions only: the decoder runs on the padded batch, the
        (possibly LoRA-wrapped) output projection only on real tokens."""
        if self._split_head is not None:
            decoder, head = self._split_head
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            return head(hidden[mask])
        return self.model(input_ids=ids, use_cache=False).logits[mask]

    def _flat_inputs(self, batch: Batch, data: list[Prepared]) -> dict[str, torch.Tensor]:
        names = set(batch.spec.required) | {n for d in data for n in d.inputs}
        flat: dict[str, torch.Tensor] = {}
        for name in names:
            parts = []
            for d in data:
                if name in d.inputs:
                    parts.append(d.inputs[name])
                else:  # an optional per-token input some datums lack: use the config value
                    parts.append(np.full(d.length, batch.config[name], dtype=np.float32))
            flat[name] = torch.from_numpy(np.concatenate(parts)).to(self.device)
        return flat

    # ---- optimizer ------------------------------------------------------------------------
    @staticmethod
    def validate_adam(a: AdamSpec) -> None:
        values = {
            "learning_rate": a.learning_rate, "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps,
            "weight_decay": a.weight_decay, "grad_clip_norm": a.grad_clip_norm,
        }
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"adam_params.{k} must be a finite number, got {v!r}")
        if a.learning_rate < 0:
            raise UserError(f"adam_params.learning_rate must be >= 0, got {a.learning_rate}")
        for k in ("beta1", "beta2"):
            if not 0.0 <= values[k] < 1.0:
                raise UserError(f"adam_params.{k} must be in [0, 1), got {values[k]}")
        for k in ("eps", "weight_decay", "grad_clip_norm"):
            if values[k] < 0:
                raise UserError(f"adam_params.{k} must be >= 0, got {values[k]}")

    def optim_step(self, adam: AdamSpec) -> dict[str, float]:
        self.validate_adam(adam)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, 2.0)
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms), 2.0).item())
        else:
            grad_norm = 0.0
        if not math.isfinite(grad_norm):
            self.clear_grads()
            raise RuntimeError(f"gradient norm is {grad_norm}; step skipped and gradients cleared")
        clipped = adam.grad_clip_norm > 0 and grad_norm > adam.grad_clip_norm
        if clipped:
            scale = adam.grad_clip_norm / (grad_norm + 1e-6)
            torch._foreach_mul_(grads, scale)
        for group in self.optimizer.param_groups:
            group["lr"] = float(adam.learning_rate)
            group["betas"] = (float(adam.beta1), float(adam.beta2))
            group["eps"] = float(adam.eps)
            group["weight_decay"] = float(adam.weight_decay)
        if grads:
            self.optimizer.step()
            self.optimizer_steps += 1
        self.clear_grads()
        return {
            "grad_norm:mean": grad_norm,
            "learning_rate:mean": float(adam.learning_rate),
            "grad_clipped:mean": 1.0 if clipped else 0.0,
        }

