"""One run's model and what each op does to it, independent of how ops arrive (Redis).

Lifecycle on one worker, which may serve several runs one after another on the same loaded
base model: ``create`` / ``create_from_checkpoint`` (seq 0) attach a LoRA adapter and remember
its initial values; ``init_trainer`` puts the adapter back to them with a fresh optimizer;
``detach`` removes the adapter so that the next run can ``create`` again. ``bind`` names the
run (``model_id``) and its ``max_seq_len`` when the worker switches runs. Seq 0 also carries the
run's activation checkpointing mode (none: the worker's default), so that each run trains with
its own; a snapshot keeps it for a worker that resumes the run.

With several ranks (:mod:`.ranks`), every method that changes the training state or runs the
model is a group call (:mod:`.group_calls`): the leader's call is made on every rank, and only
the leader writes to the object store.

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
from data_plane.trainer import snapshots
from data_plane.trainer.batches import Batch, prepare, prepare_loops
from data_plane.trainer.cpu_threads import threads_for
from data_plane.trainer.data_parallel import DataParallel
from data_plane.trainer.engine import Engine, FwdBwdResult
from data_plane.trainer.errors import UserError
from data_plane.trainer.group_calls import Group, group_call
from data_plane.trainer.loops_output import encode_forward_backward
from data_plane.trainer.model import CausalLM, LoraSettings, attach_lora, vocab_size
from data_plane.trainer.sharding import reshard
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.op_bodies import ACTIVATION_CHECKPOINTING_MODES as MODES
from data_plane.wire.op_bodies import (
    CreateBody,
    LoadWeightsBody,
    OptimStepBody,
    SaveBody,
)
from data_plane.wire.probe import probe_tokens
from data_plane.wire.queue import CheckpointFile
from data_plane.wire.tensors import forward_backward_output
from data_plane.wire.worker_config import TrainerLaunch

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
        small_op_tokens: int = 0,
        group: Group | None = None,
    ) -> None:
        self.group = group  # the other ranks (None: this process is the whole trainer)
        self.model_id = model_id
        self.base_model_name = base_model_name
        self.base = base
        self.device = device
        self.store = store
        # never beyond the positions the base model was built for
        max_pos = getattr(base.config, "max_position_embeddings", None)
        self._max_pos = max_pos if isinstance(max_pos, int) and max_pos > 0 else None
        self.max_seq_len = min(max_seq_len, self._max_pos) if self._max_pos else max_seq_len
        self.microbatch_tokens = microbatch_tokens
        self.logits_chunk_bytes = logits_chunk_bytes  # 0: full logits (see Engine)
        # auto | on | off (see Engine): the worker's default, for runs that choose none
        self.activation_checkpointing = activation_checkpointing
        self.logits_full_max_bytes = logits_full_max_bytes  # chunk only above this (see Engine)
        self.small_op_tokens = small_op_tokens  # on a CPU, ops this small run on one thread (cpu_threads)
        self.vocab_size = vocab_size(base)
        self.lora: LoraSettings | None = None
        # the live run's own activation checkpointing mode (None: it chose none)
        self.run_checkpointing: str | None = None
        self.peft: CausalLM | None = None
        self.engine: Engine | None = None
        # trainable params right after seq 0 (CPU; replaced, never modified in place)
        self.initial: dict[str, torch.Tensor] | None = None
        # the metrics of the last forward / forward_backward and whether it was forward-only
        # (the worker's telemetry reads them; the answer itself is already encoded)
        self.last_metrics: dict[str, float] = {}
        self.last_forward_only = False

    @classmethod
    def from_launch(cls, launch: TrainerLaunch, store: ObjectStore, group: Group | None = None) -> TrainingModel:
        """Load the worker's base model (this rank's part of it, with several ranks) and wrap it."""
        from data_plane.trainer.model import load_base, pick_device, pick_dtype
        from data_plane.trainer.sharding import load_sharded_base

        if group is not None:
            device = group.ranks.device
            base = load_sharded_base(launch.model_source, group.ranks, pick_dtype(device))
        else:
            device = pick_device(launch.device)
            base = load_base(launch.model_source, device, pick_dtype(device))
        return cls(
            model_id="",
            base_model_name=launch.base_model,
            base=base,
            device=device,
            store=store,
            max_seq_len=launch.max_seq_len,
            microbatch_tokens=launch.microbatch_tokens,
            logits_chunk_bytes=launch.logits_chunk_mib << 20,
            activation_checkpointing=launch.activation_checkpointing,
            logits_full_max_bytes=launch.logits_full_max_mib << 20,
            small_op_tokens=launch.small_op_tokens,
            group=group,
        )

    @group_call
    def bind(self, model_id: str, max_seq_len: int) -> None:
        """Serve the run ``model_id`` (its sequences at most ``max_seq_len`` tokens) from now on."""
        self.model_id = model_id
        self.max_seq_len = min(max_seq_len, self._max_pos) if self._max_pos else max_seq_len

    @property
    def leader(self) -> bool:
        """Whether this rank writes checkpoints (the only rank, or rank 0 of several)."""
        return self.group is None or self.group.is_leader

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

    def _attach(self, settings: LoraSettings, checkpointing: str | None) -> None:
        """Attach the run's adapter and build its engine; ``checkpointing`` is the run's
        activation checkpointing mode (None: this worker's default)."""
        if self.created:
            raise UserError("the model already exists (create/load as seq 0 runs once)")
        mode = self._checkpointing_mode(checkpointing)
        self.peft = attach_lora(self.base, settings)
        self.lora = settings
        try:
            self.engine = Engine(
                self.peft,
                self.device,
                self.microbatch_tokens,
                self.logits_chunk_bytes,
                mode,
                self.logits_full_max_bytes,
                ranks=self._shares(),
            )
        except BaseException:
            self.detach()
            raise
        self.run_checkpointing = checkpointing
        n = sum(p.numel() for p in self.engine.params)
        log.info(
            "LoRA attached: rank=%d alpha=%g targets=%s trainable=%d activation_checkpointing=%s%s",
            settings.rank,
            settings.alpha,
            settings.target_modules(),
            n,
            mode,
            "" if checkpointing else " (the worker's default)",
        )

    def _checkpointing_mode(self, checkpointing: str | None) -> str:
        """The mode a run trains with: its own choice, else this worker's default."""
        if checkpointing is None:
            return self.activation_checkpointing
        if checkpointing not in MODES:
            raise UserError(f"activation_checkpointing must be one of {', '.join(MODES)}, got {checkpointing!r}")
        return checkpointing

    def _shares(self) -> DataParallel | None:
        """How this rank splits batches with the others (None: it is the only one)."""
        return DataParallel(self.group.ranks) if self.group is not None and self.group.ranks.world > 1 else None

    def attach_for_restore(self, settings: LoraSettings, checkpointing: str | None) -> None:
        """Attach an adapter whose values a snapshot restore fills in next
        (:func:`data_plane.trainer.snapshots.restore`), with the run's checkpointing mode."""
        self._attach(settings, checkpointing)

    # ---- seq 0 --------------------------------------------------------------------------
    @group_call
    def create(self, body: CreateBody) -> dict:
        # Without a client seed the adapter's seed comes from the model id, so that a worker
        # replaying this op after a crash builds the same initial adapter.
        self._attach(
            LoraSettings.resolve(body.lora, default_seed=seed_of(self.model_id)), body.activation_checkpointing
        )
        self._remember_initial()
        return {"model_id": self.model_id, "type": "create_model"}

    @group_call
    def create_from_checkpoint(self, body: LoadWeightsBody) -> dict:
        loaded = ckpt.read_checkpoint(self.store, body.storage_prefix, body.tinker_path, body.optimizer)
        if loaded.meta is not None and loaded.meta.base_model != self.base_model_name:
            log.warning(
                "checkpoint base model %r differs from this worker's %r", loaded.meta.base_model, self.base_model_name
            )
        self._attach(loaded.lora, body.activation_checkpointing)
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
    @group_call
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

    @group_call
    def detach(self) -> None:
        """Remove the LoRA adapter (the base model is bare and unwrapped again) and drop the
        optimizer and everything else of this run, so that ``create`` /
        ``create_from_checkpoint`` can build a new adapter on the same base. No-op without one."""
        if self.peft is not None:
            self.base = self.peft.unload()
        self.peft = None
        self.engine = None
        self.lora = None
        self.run_checkpointing = None
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
    @group_call
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

    @group_call
    def forward_backward(self, raw: bytes) -> bytes:
        eng = self._require()
        try:
            req = pb.ForwardBackwardRequest.FromString(raw)
        except DecodeError as exc:
            raise UserError(f"forward_backward body is not a valid ForwardBackwardRequest protobuf: {exc}") from None
        batch = prepare(req, self.vocab_size, self.max_seq_len)
        res = self._run(eng, batch)
        self.last_metrics, self.last_forward_only = res.metrics, batch.forward_only
        return forward_backward_output(res.per_datum, res.metrics).SerializeToString()

    @group_call
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
        res = self._run(eng, batch)
        self.last_metrics, self.last_forward_only = res.metrics, batch.forward_only
        return encode_forward_backward(res.loss, res.per_datum, res.metrics)

    def _run(self, eng: Engine, batch: Batch) -> FwdBwdResult:
        with threads_for(self.device, sum(d.length for d in batch.data), self.small_op_tokens):
            return eng.forward_backward(batch)

    @group_call
    def optim_step(self, body: OptimStepBody) -> dict:
        return {"metrics": self._require().optim_step(body.adam)}

    def _probe(self, eng: Engine) -> dict[str, Any]:
        tokens = probe_tokens(self.vocab_size)
        return {"tokens": tokens, "logprobs": eng.prompt_logprobs(tokens)}

    @group_call
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
        if not self.leader:  # every rank holds the same adapter: the leader writes it
            reshard(self.base)
            return SaveOutcome([], {}, self.lora.to_dict())
        try:
            files = ckpt.write_checkpoint(
                self.store,
                body.storage_prefix,
                kind=kind,
                peft_model=self.peft,
                meta=meta,
                optimizer=eng.optimizer if kind == "weights" else None,
                named_params=eng.named_params,
            )
        finally:
            if self.group is not None:
                reshard(self.base)  # as the followers do (taking the state dict resharded some units)
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

    @group_call
    def restore_snapshot(self, snap: snapshots.RunSnapshot) -> None:
        """Put a run snapshot into this model (which has no adapter yet): see
        :func:`data_plane.trainer.snapshots.restore`."""
        snapshots.restore(self, snap)
