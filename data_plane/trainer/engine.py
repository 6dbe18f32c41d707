"""The training engine of one LoRA model: forward/backward with gradient accumulation,
forward-only evaluation, and AdamW steps.

- ``forward_backward`` adds the gradient of the summed loss to ``.grad`` (accumulating across
  calls until the next ``optim_step``); ``forward_only`` runs under ``no_grad`` and touches no
  gradients.
- Datums are grouped into micro-batches under a padded-token budget (``B * max_len <=
  microbatch_tokens``; a longer datum runs alone), sorted by length to limit padding. Padding
  is on the right, so causal attention never sees it and no attention mask is needed. The two
  datums of a ``dpo`` pair always share a micro-batch.
- Every input is validated (:mod:`data_plane.trainer.batches`) before anything runs; a
  non-finite loss aborts the call and restores the gradients (and the normalization counters)
  to what they were before it.

Two request dialects share this engine:

- **Tinker** (``batches.prepare``): the loss is a plain sum over tokens (over pairs for ``dpo``),
  outputs are unmasked, metric keys are ``name:reduction``.
- **Loops** (``batches.prepare_loops``): a target of ``-100`` marks an ignored position (gathered
  with a safe id, weight 0); ``weights`` is optional for every loss (default 1) and multiplies
  the per-token loss. *Active* positions: target != -100 and weight != 0. The reported loss is
  the mean over active tokens (over pairs for ``dpo``; for 2-D targets a position counts once)
  unless the option ``skip_token_normalization`` is 1. Gradients are always accumulated as the
  sum; the normalization is deferred to ``optim_step``, which divides the accumulated gradients
  by the number of active tokens (pairs) of all normalized calls since the last step *before*
  the gradient norm and clipping, so several calls before one step equal one call over all the
  data. A step cannot mix normalized Loops calls with summed ones (Tinker calls or
  ``skip_token_normalization=1``): the call that would mix them is refused before it runs.
  Outputs are NaN at inactive positions; the ``top_k_logprobs`` option adds the k most likely
  next tokens per position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from data_plane.trainer import chunked_head
from data_plane.trainer.activation_checkpointing import LayerCheckpointing
from data_plane.trainer.batches import Batch, Prepared, plan_microbatches
from data_plane.trainer.data_parallel import DataParallel
from data_plane.trainer.errors import UserError
from data_plane.trainer.losses import (
    dpo_stats,
    sequence_scores,
    target_logprobs_and_lse,
    top_k_logprobs,
)
from data_plane.trainer.model import CausalLM, vocab_size
from data_plane.wire.op_bodies import AdamSpec


@dataclass(slots=True)
class FwdBwdResult:
    per_datum: list[dict[str, np.ndarray]]  # logprobs[, elementwise_loss, top_k_*] (shape of target_tokens)
    metrics: dict[str, float]
    loss: float = 0.0  # the reported loss (Loops: normalized unless skip_token_normalization)


@dataclass(slots=True)
class _Totals:
    """Sums over the micro-batches of one call."""

    loss: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)  # per-token stats, summed over active tokens
    pair_stats: dict[str, float] = field(default_factory=dict)  # dpo metrics, summed over pairs

    def add(self, into: dict[str, float], values: dict[str, float]) -> None:
        for k, v in values.items():
            into[k] = into.get(k, 0.0) + v


class NonFiniteLoss(UserError):
    pass


MEAN, SUM = "mean", "sum"  # how the gradients accumulated since the last optim_step are normalized


def _split_head(model: CausalLM) -> tuple[torch.nn.Module, torch.nn.Module] | None:
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
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "Phi3ForCausalLM",
}


class Engine:
    def __init__(
        self,
        model: CausalLM,
        device: torch.device,
        microbatch_tokens: int,
        logits_chunk_bytes: int = 0,
        activation_checkpointing: str = "off",
        logits_full_max_bytes: int = 0,
        ranks: DataParallel | None = None,
    ) -> None:
        self.model = model
        # the trainer's other ranks: this one runs its share of each call and sums with theirs
        self.ranks = ranks
        self.device = device
        self.microbatch_tokens = max(1, int(microbatch_tokens))
        # > 0: log-probabilities through the output projection a chunk of positions at a time
        # (data_plane.trainer.chunked_head), never the whole [tokens, vocab] logits
        self.logits_chunk_bytes = max(0, int(logits_chunk_bytes))
        # ... but only for micro-batches whose whole logits would exceed this (smaller ones are
        # faster in one piece: chunking computes the output projection twice)
        self.logits_full_max_bytes = max(0, int(logits_full_max_bytes))
        # recompute decoder activations in the backward pass instead of keeping them
        self.checkpointing = LayerCheckpointing(model, activation_checkpointing)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.optimizer = self.new_optimizer()
        self.optimizer_steps = 0  # how many optim_steps these weights have taken
        self._split_head = _split_head(model)
        self._vocab = vocab_size(model)  # the width of one position's logits
        # since the last optim_step: MEAN (normalized Loops calls), SUM (anything else) or None
        self._accum_mode: str | None = None
        self._accum_count = 0  # active tokens (dpo: pairs) of the normalized calls

    def new_optimizer(self) -> torch.optim.AdamW:
        d = AdamSpec()
        return torch.optim.AdamW(
            self.params,
            lr=d.learning_rate,
            betas=(d.beta1, d.beta2),
            eps=d.eps,
            weight_decay=d.weight_decay,
            foreach=True,
        )

    def reset_optimizer(self) -> None:
        self.optimizer = self.new_optimizer()

    def clear_grads(self) -> None:
        """Drop the accumulated gradients (and with them the normalization counters)."""
        for p in self.params:
            p.grad = None
        self._accum_mode = None
        self._accum_count = 0

    def reset(self) -> None:
        """A fresh optimizer, no gradients, step counter 0 (the weights are the caller's job)."""
        self.clear_grads()
        self.reset_optimizer()
        self.optimizer_steps = 0

    @property
    def accumulation(self) -> tuple[str | None, int]:
        """(``"mean"`` | ``"sum"`` | None, normalizer count) of the gradients since the last step."""
        return self._accum_mode, self._accum_count

    def set_accumulation(self, mode: str | None, count: int) -> None:
        """Restore the normalization counters of restored gradients (a snapshot restore)."""
        if mode not in (None, MEAN, SUM):
            raise ValueError(f"unknown accumulation mode {mode!r}")
        self._accum_mode, self._accum_count = mode, int(count)

    # ---- forward / backward -------------------------------------------------------------
    def forward_backward(self, batch: Batch) -> FwdBwdResult:
        mode = None
        if not batch.forward_only:
            mode = MEAN if batch.normalize else SUM
            self._check_accumulation(mode)
        per_datum: list[dict[str, np.ndarray] | None] = [None] * len(batch.data)
        totals = _Totals()
        before = None if batch.forward_only else [None if p.grad is None else p.grad.clone() for p in self.params]
        dp = self.ranks
        empty_passes = 0
        if dp is None:
            groups = plan_microbatches(batch.data, self.microbatch_tokens, pairs=batch.pairs)
        else:
            groups, empty_passes = dp.plan(batch.data, self.microbatch_tokens, batch.pairs)
            if before is not None:
                for p in self.params:  # this rank's share, from zero (summed with the others' below)
                    p.grad = None
        error: Exception | None = None
        try:
            try:
                for group in groups:
                    self._run_group(batch, group, per_datum, totals)
                for _ in range(empty_passes):
                    self._empty_pass(batch.forward_only)
            except Exception as exc:
                if dp is None:
                    raise
                error = exc
            if dp is not None:
                sums, error = dp.merge(per_datum, (totals.loss, totals.stats, totals.pair_stats), error)
                totals = _Totals(*sums)
                if error is not None:
                    raise error
                if before is not None:
                    dp.sum_grads(self.params, before)
        except BaseException:
            if before is not None:
                for p, g in zip(self.params, before, strict=True):
                    p.grad = g
            raise
        if mode is not None:
            self._accum_mode = mode
            if mode == MEAN:
                self._accum_count += batch.norm_count()
        metrics, loss = self._metrics(batch, totals)
        return FwdBwdResult([d for d in per_datum if d is not None], metrics, loss)

    def _check_accumulation(self, mode: str) -> None:
        if self._accum_mode is None or self._accum_mode == mode:
            return
        if self._accum_mode == MEAN:
            raise UserError(
                "the gradients accumulated since the last optim_step are token-normalized (Loops "
                "forward_backward without skip_token_normalization); a summed loss (a Tinker "
                "forward_backward or skip_token_normalization=1) cannot be added to them: call optim_step first"
            )
        raise UserError(
            "the gradients accumulated since the last optim_step are summed (a Tinker forward_backward "
            "or skip_token_normalization=1); a token-normalized Loops forward_backward cannot be added "
            "to them: call optim_step first, or pass skip_token_normalization=1"
        )

    def _metrics(self, batch: Batch, t: _Totals) -> tuple[dict[str, float], float]:
        n_pairs = len(batch.data) // 2
        tokens = sum(d.num_active for d in batch.data) if batch.loops else sum(d.length for d in batch.data)
        extra = {k: v / max(n_pairs, 1) for k, v in t.pair_stats.items()}
        extra.update({k: v / max(tokens, 1) for k, v in t.stats.items()})
        if not batch.loops:
            metrics = {"loss:sum": t.loss, "num_tokens:sum": float(tokens)}
            metrics.update({f"{k}:mean": v for k, v in extra.items()})
            return metrics, t.loss
        count = batch.norm_count()
        loss = (t.loss / count if count else 0.0) if batch.normalize else t.loss
        metrics = {
            "loss": loss,
            "num_tokens": float(tokens),
            "skip_token_normalization": 0.0 if batch.normalize else 1.0,
        }
        if batch.pairs:
            metrics["num_pairs"] = float(n_pairs)
        metrics.update(extra)
        return metrics, loss

    def _run_group(self, batch: Batch, group: list[int], out: list, totals: _Totals) -> None:
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
        scale = None
        if data[0].scale is not None:
            scale = torch.from_numpy(np.concatenate([d.scale for d in data])).to(self.device)

        elementwise = None
        checkpointed = not batch.forward_only and self.checkpointing.wanted(t_max)
        with torch.set_grad_enabled(not batch.forward_only), self.checkpointing.enabled(checkpointed):
            tlp, top = self._target_logprobs(ids_t, mask, targets, batch.top_k)  # rows in datum order
            if batch.pairs:  # group = consecutive (chosen, rejected) pairs
                segments = torch.from_numpy(np.repeat(np.arange(len(data)), lengths)).to(self.device)
                scores = sequence_scores(tlp, inputs["ref_logprobs"], scale, segments, len(data))
                loss = batch.spec.pair_loss(scores[0::2], scores[1::2], batch.config).sum()
            else:
                elementwise = batch.spec.token_loss(tlp, inputs, batch.config)
                if scale is not None:
                    elementwise = elementwise * scale
                loss = elementwise.sum()
        loss_value = float(loss.detach().item())
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f"the {batch.loss_fn} loss is not finite ({loss_value}); check logprobs/advantages "
                "(e.g. sampler logprobs far below the model's make exp(ratio) overflow)"
            )
        totals.loss += loss_value
        if batch.pairs:
            totals.add(totals.pair_stats, dpo_stats(scores[0::2], scores[1::2], batch.config))
        if batch.spec.stats is not None:
            counted = torch.from_numpy(np.concatenate([d.active_rows for d in data])).to(self.device)
            stats = batch.spec.stats(tlp.detach(), inputs, batch.config)
            totals.add(totals.stats, {k: float((v * counted).sum().item()) for k, v in stats.items()})
        if not batch.forward_only:
            loss.backward()
        fields = {"logprobs": tlp.detach().float().cpu().numpy()}
        if elementwise is not None:
            fields["elementwise_loss"] = elementwise.detach().float().cpu().numpy()
        top_np = None if top is None else (top[0].cpu().numpy(), top[1].cpu().numpy())
        start = 0
        for i, d in zip(group, data, strict=True):
            end = start + d.length
            rec = {name: arr[start:end] for name, arr in fields.items()}
            if d.scored is not None:  # Loops: NaN where there is no target
                rec = {
                    name: np.where(d.scored, arr, np.float32(np.nan)).astype(np.float32) for name, arr in rec.items()
                }
            if top_np is not None:
                scored = d.scored if d.scored is not None else np.ones(d.targets.shape, dtype=bool)
                rows = (scored if scored.ndim == 1 else np.asarray(scored.any(axis=1)))[:, None]
                rec["top_k_logprobs"] = np.where(rows, top_np[0][start:end], np.float32(np.nan)).astype(np.float32)
                rec["top_k_token_ids"] = np.where(rows, top_np[1][start:end], -1).astype(np.int64)
            out[i] = rec
            start = end

    def _empty_pass(self, forward_only: bool) -> None:
        """A one-token forward (and backward) pass that changes nothing: it keeps this rank in
        step with the other shards of its replica when it has one micro-batch fewer."""
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        with torch.set_grad_enabled(not forward_only):
            logits = self._logits(ids, torch.ones_like(ids, dtype=torch.bool))
            if not forward_only:
                (logits.sum() * 0.0).backward()

    @torch.no_grad()
    def prompt_logprobs(self, tokens: list[int]) -> list[float]:
        """The logprob of each token after the ones before it (``len(tokens) - 1`` values),
        with the current weights: what a server of these weights answers as prompt logprobs."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        logits = self._logits(ids, torch.ones_like(ids, dtype=torch.bool)).float()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        return lp.gather(1, ids[0, 1:, None]).squeeze(1).tolist()

    def _target_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Log-probabilities of ``targets`` at the unpadded positions (and the top-k there):
        chunk by chunk through the output projection when the model allows it
        (:mod:`data_plane.trainer.chunked_head`), else from the full logits."""
        full_bytes = int(targets.shape[0]) * self._vocab * chunked_head.FLOAT32_BYTES
        if self.logits_chunk_bytes and self._split_head is not None and full_bytes > self.logits_full_max_bytes:
            decoder, head = self._split_head
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[mask]
            rows = chunked_head.rows_per_chunk(self._vocab, self.logits_chunk_bytes)
            tlp, _lse, top = chunked_head.target_logprobs(head, hidden, targets, rows, top_k)
            return tlp, top
        flat_logits = self._logits(ids, mask)  # [M, V]
        tlp, lse = target_logprobs_and_lse(flat_logits, targets)
        return tlp, (top_k_logprobs(flat_logits, lse, top_k) if top_k else None)

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
            "learning_rate": a.learning_rate,
            "beta1": a.beta1,
            "beta2": a.beta2,
            "eps": a.eps,
            "weight_decay": a.weight_decay,
            "grad_clip_norm": a.grad_clip_norm,
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
        """One AdamW step on the accumulated gradients (first divided by the normalizer count when
        they come from token-normalized Loops calls), then clear them."""
        self.validate_adam(adam)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and self._accum_mode == MEAN and self._accum_count > 0:
            torch._foreach_mul_(grads, 1.0 / self._accum_count)
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
