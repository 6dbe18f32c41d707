"""One run's model and what each op does to it, independent of how ops arrive (Redis).

Lifecycle on one worker, which may serve several runs one after another on the same loaded
base model: ``create`` / ``create_from_checkpoint`` (seq 0) attach a LoRA adapter and remember
its initial values; ``init_trainer`` puts the adapter back to them with a fresh optimizer;
``detach`` removes the adapter so that the next run can ``create`` again. ``model_id`` and
``max_seq_len`` are plain attributes the worker may reassign when it switches runs.

Two request dialects reach ``forward_backward`` (see :mod:`data_plane.trainer.engine`): the
Tinker protobuf one (:meth:`TrainingModel.forward_backward`, protobuf answer) and the Loops one
(:meth:`TrainingModel.loops_forward_backward`, JSON answer from :mod:`.loops_output`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf.message import DecodeError

from data_plane.storage.base import ObjectStore
from data_plane.trainer import checkpoint as ckpt
from data_plane.trainer.batches import prepare, prepare_loops
from data_plane.trainer.engine import Engine
from data_plane.trainer.errors import UserError
from data_plane.trainer.loops_output import encode_forward_backward
from data_plane.trainer.model import CausalLM, LoraSettings, attach_lora, vocab_size
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.op_bodies import (
    CreateBody,
    LoadWeightsBody,
    OptimStepBody,
    SaveBody,
)
from data_plane.wire.probe import probe_tokens
from data_plane.wire.queue import CheckpointFile
from data_plane.wire.tensors import forward_backward_output

log = logging.getLogger(__name__)


def seed_of(model_id: str) -> int:
    """A stable 31-bit seed derived from a model id."""
    return int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True, slots=True)
class SaveOutcome:
    files: list[CheckpointFile]
    result: dict
    lora: dict


class TrainingModel:
    """The frozen base model plus, once seq 0 ran, the LoRA adapter and its optimizer."""

    def __init__(
        self,
        *,
        model_id: str,
        base_model_name: str,
        base: CausalLM,
        device: torch.device,
        store: ObjectStore,
        max_seq_len: int,
        microbatch_tokens: int,
        logits_chunk_bytes: int = 0,
        activation_checkpointing: str = "off",
        logits_full_max_bytes: int = 0,
    ) -> None:
        self.model_id = model_id
        self.base_model_name = base_model_name
        self.base = base
        self.device = device
        self.store = store
        # never beyond the positions the base model was built for
        max_pos = getattr(base.config, "max_position_embeddings", None)
        self.max_seq_len = min(max_seq_len, max_pos) if isinstance(max_pos, int) and max_pos > 0 else max_seq_len
        self.microbatch_tokens = microbatch_tokens
        self.logits_chunk_bytes = logits_chunk_bytes  # 0: full logits (see Engine)
        self.activation_checkpointing = activation_checkpointing  # auto | on | off (see Engine)
        self.logits_full_max_bytes = logits_full_max_bytes  # chunk only above this (see Engine)
        self.vocab_size = vocab_size(base)
        self.lora: LoraSettings | None = None
        self.peft: CausalLM | None = None
        self.engine: Engine | None = None
        # trainable params right after seq 0 (CPU; replaced, never modified in place)
        self.initial: dict[str, torch.Tensor] | None = None

    @property
    def created(self) -> bool:
        return self.engine is not None

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps the live adapter's weights have taken (0 when there is no adapter)."""
        return 0 if self.engine is None else self.engine.optimizer_steps

    def _require(self) -> Engine:
        if self.engine is None:
            raise UserError("the model has not been created (its create/load op failed or never ran)")
        return self.engine

    def _attach(self, settings: LoraSettings) -> None:
        if self.created:
            raise UserError("the model already exists (create/load as seq 0 runs once)")
        self.peft = attach_lora(self.base, settings)
        self.lora = settings
        try:
            self.engine = Engine(
                self.peft,
                self.device,
                self.microbatch_tokens,
                self.logits_chunk_bytes,
                self.activation_checkpointing,
                self.logits_full_max_bytes,
            )
        except BaseException:
            self.detach()
            raise
        n = sum(p.numel() for p in self.engine.params)
        log.info(
            "LoRA attached: rank=%d alpha=%g targets=%s trainable=%d",
            settings.rank,
            settings.alpha,
            settings.target_modules(),
            n,
        )

    def attach_for_restore(self, settings: LoraSettings) -> None:
        """Attach an adapter whose values a snapshot restore fills in next
        (:func:`data_plane.trainer.snapshots.restore`)."""
        self._attach(settings)

    # ---- seq 0 --------------------------------------------------------------------------
    def create(self, body: CreateBody) -> dict:
        # Without a client seed the adapter's seed comes from the model id, so that a worker
        # replaying this op after a crash builds the same initial adapter.
        self._attach(LoraSettings.resolve(body.lora, default_seed=seed_of(self.model_id)))
        self._remember_initial()
        return {"model_id": self.model_id, "type": "create_model"}

    def create_from_checkpoint(self, body: LoadWeightsBody) -> dict:
        loaded = ckpt.read_checkpoint(self.store, body.storage_prefix, body.tinker_path, body.optimizer)
        if loaded.meta is not None and loaded.meta.base_model != self.base_model_name:
            log.warning(
                "checkpoint base model %r differs from this worker's %r", loaded.meta.base_model, self.base_model_name
            )
        self._attach(loaded.lora)
        try:
            self._restore(loaded, body.optimizer)
        except BaseException:
            # Leave no half-initialised model behind: seq 0 failed, nothing exists (and the base
            # is bare again, so that a later create can attach).
            self.detach()
            raise
        self._remember_initial()
        return {
            "type": "load_weights",
            "path": body.tinker_path,
            "model_id": self.model_id,
            "step": self.optimizer_steps,
        }

    def _remember_initial(self) -> None:
        eng = self._require()
        self.initial = {n: p.detach().to("cpu", copy=True) for n, p in eng.named_params}

    # ---- run lifecycle ------------------------------------------------------------------
    def init_trainer(self, lora_rank: int) -> dict:
        """Start a run over on the live adapter: its initial values (those right after seq 0),
        a fresh optimizer, no gradients, step 0. ``lora_rank`` must be the adapter's rank."""
        eng = self._require()
        assert self.lora is not None and self.initial is not None
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int):
            raise UserError(f"lora_rank must be an integer, got {lora_rank!r}")
        if lora_rank != self.lora.rank:
            raise UserError(f"lora_rank {lora_rank} does not match this trainer's LoRA rank {self.lora.rank}")
        with torch.no_grad():
            for n, p in eng.named_params:
                p.copy_(self.initial[n])
        eng.reset()
        return {"step": 0, "lora_rank": self.lora.rank}

    def detach(self) -> None:
        """Remove the LoRA adapter (the base model is bare and unwrapped again) and drop the
        optimizer and everything else of this run, so that ``create`` /
        ``create_from_checkpoint`` can build a new adapter on the same base. No-op without one."""
        if self.peft is not None:
            self.base = self.peft.unload()
        self.peft = None
        self.engine = None
        self.lora = None
        self.initial = None

    def _restore(self, loaded: ckpt.LoadedCheckpoint, with_optimizer: bool) -> None:
        eng = self._require()
        ckpt.load_adapter_into(self.peft, loaded.adapter)
        eng.clear_grads()
        eng.reset_optimizer()
        if with_optimizer and loaded.optimizer is not None:
            ckpt.load_optimizer_into(eng.optimizer, eng.named_params, loaded.optimizer)
        eng.optimizer_steps = loaded.meta.optimizer_step if loaded.meta is not None else 0

    # ---- later ops ----------------------------------------------------------------------
    def load(self, body: LoadWeightsBody) -> dict:
        """Legacy ``load_state[_with_optimizer]`` on the live model: replaces the adapter (and
        the optimizer state, or resets it) and drops accumulated gradients."""
        eng = self._require()
        loaded = ckpt.read_checkpoint(self.store, body.storage_prefix, body.tinker_path, body.optimizer)
        assert self.lora is not None
        mine, theirs = self.lora, loaded.lora
        if (mine.rank, mine.target_modules(), mine.alpha) != (theirs.rank, theirs.target_modules(), theirs.alpha):
            raise UserError(
                f"checkpoint LoRA (rank {theirs.rank}, alpha {theirs.alpha:g}, {theirs.target_modules()}) does not "
                f"match this model's (rank {mine.rank}, alpha {mine.alpha:g}, {mine.target_modules()})"
            )
        # Validate everything, then swap: on a bad optimizer state the old one stays in place.
        snapshot = {n: p.detach().clone() for n, p in eng.named_params}
        old_opt, old_steps = eng.optimizer, eng.optimizer_steps
        try:
            self._restore(loaded, body.optimizer)
        except BaseException:
            with torch.no_grad():
                for n, p in eng.named_params:
                    p.copy_(snapshot[n])
            eng.optimizer, eng.optimizer_steps = old_opt, old_steps
            raise
        return {
            "type": "load_weights",
            "path": body.tinker_path,
            "model_id": self.model_id,
            "step": eng.optimizer_steps,
        }

    def forward_backward(self, raw: bytes) -> bytes:
        eng = self._require()
        try:
            req = pb.ForwardBackwardRequest.FromString(raw)
        except DecodeError as exc:
            raise UserError(f"forward_backward body is not a valid ForwardBackwardRequest protobuf: {exc}") from None
        batch = prepare(req, self.vocab_size, self.max_seq_len)
        res = eng.forward_backward(batch)
        return forward_backward_output(res.per_datum, res.metrics).SerializeToString()

    def loops_forward_backward(self, raw: bytes) -> bytes:
        """The Loops dialect of forward / forward_backward: ``raw`` is a ForwardBackwardRequest
        built from the Loops SDK's JSON (``-100`` targets ignored, optional weights, per-token
        mean unless ``skip_token_normalization``; ``top_k_logprobs`` option); the answer is
        UTF-8 JSON (see :func:`data_plane.trainer.loops_output.encode_forward_backward`)."""
        eng = self._require()
        try:
            req = pb.ForwardBackwardRequest.FromString(raw)
        except DecodeError as exc:
            raise UserError(f"forward_backward body is not a valid ForwardBackwardRequest protobuf: {exc}") from None
        batch = prepare_loops(req, self.vocab_size, self.max_seq_len)
        res = eng.forward_backward(batch)
        return encode_forward_backward(res.loss, res.per_datum, res.metrics)

    def optim_step(self, body: OptimStepBody) -> dict:
        return {"metrics": self._require().optim_step(body.adam)}

    def _probe(self, eng: Engine) -> dict[str, Any]:
        tokens = probe_tokens(self.vocab_size)
        return {"tokens": tokens, "logprobs": eng.prompt_logprobs(tokens)}

    def save(self, body: SaveBody, seq_id: int) -> SaveOutcome:
        eng = self._require()
        kind = body.checkpoint_kind
        if kind not in ckpt.KINDS:
            raise UserError(f"unknown checkpoint kind {kind!r}")
        if kind in ("weights", "external_weights") and not body.name:
            raise UserError(f"saving {kind} needs a checkpoint name")
        if body.name is not None and "/" in body.name:
            raise UserError(f"checkpoint names may not contain '/': {body.name!r}")
        assert self.lora is not None
        meta = ckpt.CheckpointMeta(
            kind=kind,
            model_id=self.model_id,
            base_model=self.base_model_name,
            lora=self.lora.to_dict(),
            target_modules=self.lora.target_modules(),
            optimizer_step=eng.optimizer_steps,
            has_optimizer=kind == "weights",
            seq_id=seq_id,
            probe=self._probe(eng) if kind == "sampler_weights" else None,
        )
        files = ckpt.write_checkpoint(
            self.store,
            body.storage_prefix,
            kind=kind,
            peft_model=self.peft,
            meta=meta,
            optimizer=eng.optimizer if kind == "weights" else None,
            named_params=eng.named_params,
        )
        result: dict[str, Any]
        if kind == "weights":
            result = {"path": f"tinker://{self.model_id}/weights/{body.name}", "type": "save_weights"}
        elif kind == "external_weights":
            result = {
                "path": f"tinker://{self.model_id}/external_weights/{body.name}",
                "size_bytes": sum(f.size_bytes for f in files),
                "type": "save_weights_external",
            }
        elif body.name is not None:
            result = {
                "path": f"tinker://{self.model_id}/sampler_weights/{body.name}",
                "type": "save_weights_for_sampler",
            }
        else:
            result = {}  # unnamed sampler snapshot: the control plane fills in sampling_session_id
        return SaveOutcome(files, result, self.lora.to_dict())
