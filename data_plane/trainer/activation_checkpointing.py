"""Activation checkpointing of the decoder layers, switchable per micro-batch.

With it on, a decoder layer's forward pass keeps only its inputs; the backward pass runs the
layer again to get the activations it needs (``torch.utils.checkpoint``, non-reentrant). The
results are the same (the recomputation is the same computation); the cost is one more
forward pass of the decoder per backward.

Each decoder layer of the base model is wrapped once (the wrapper stays with the base, which
outlives runs); whether a call checkpoints is an attribute of the layer that the engine sets
around each micro-batch. The mode is the run's: each run's engine gets the one its seq-0 op
chose, or the worker's default (``TrainerLaunch.activation_checkpointing``). Transformers' own ``gradient_checkpointing_enable`` is not used: it
only acts in training mode, and the trainer keeps the model in eval mode.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from data_plane.wire.op_bodies import ACTIVATION_CHECKPOINTING_MODES as MODES

_FLAG = "_openloops_checkpoint"
# "auto" checkpoints a micro-batch whose longest sequence has at least this many tokens: the
# micro-batch budget bounds the activations of short sequences, but a longer sequence runs
# alone whatever its length (and recomputing costs about a quarter more step time)
AUTO_MIN_SEQUENCE = 4096


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a (PEFT-wrapped) causal LM; [] when it has no ``layers`` list."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    get_decoder = getattr(base, "get_decoder", None)
    if not callable(get_decoder):
        return []
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError):
        return []
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _wrap(layer: torch.nn.Module) -> None:
    if hasattr(layer, _FLAG):
        return
    original = layer.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if getattr(layer, _FLAG) and torch.is_grad_enabled():
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)

    setattr(layer, _FLAG, False)
    layer.forward = forward


class LayerCheckpointing:
    def __init__(self, model: torch.nn.Module, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"activation checkpointing must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.layers = decoder_layers(model) if mode != "off" else []
        for layer in self.layers:
            _wrap(layer)

    def wanted(self, longest: int) -> bool:
        """Whether a micro-batch whose longest sequence has ``longest`` tokens is checkpointed."""
        if not self.layers:
            return False
        return self.mode == "on" or (self.mode == "auto" and longest >= AUTO_MIN_SEQUENCE)

    @contextmanager
    def enabled(self, on: bool) -> Iterator[None]:
        for layer in self.layers:
            setattr(layer, _FLAG, on)
        try:
            yield
        finally:
            for layer in self.layers:
                setattr(layer, _FLAG, False)
