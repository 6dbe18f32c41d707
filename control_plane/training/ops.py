"""Tinker training operations: validate a request, then hand it to the run's trainer worker.

Every op of a training model is keyed by ``(model_id, seq_id)``; the first submission claims
the pair and later ones get the same future back (see :class:`TrainerQueue`). A repeated
submission is answered before any validation, so an HTTP retry of an op that already ran
(a save whose name now exists, say) still gets its original future.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import zstandard
from google.protobuf.message import DecodeError
from sqlalchemy import select

from control_plane.auth.principal import Principal
from control_plane.db.models import Checkpoint, Run
from control_plane.errors import DomainError, Gone, InvalidInput, NotFound
from control_plane.ids import training_model_id
from control_plane.scaling.wake import op_arrived
from control_plane.services import admission, run_options
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import runs as runs_svc
from control_plane.statuses import TERMINAL, Status
from control_plane.training.completions import snapshot_name
from control_plane.training.queue import TrainerQueue
from data_plane.wire import op_bodies
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.paths import CheckpointRef, PathError, validate_name
from data_plane.wire.queue import ErrorCategory, FutureResult, OpKind

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
MAX_SEQ_ID = 2**31 - 1
SUPPORTED_OPTIMIZERS = ("adamw",)
ZSTD_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Submitted:
    request_id: str
    model_id: str

    def future(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "model_id": self.model_id}


@dataclass(frozen=True)
class LoraRequest:
    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


def _check_seq(seq_id: int, *, first: int = 1) -> None:
    if not first <= seq_id <= MAX_SEQ_ID:
        raise InvalidInput(f"seq_id must be between {first} and {MAX_SEQ_ID}, got {seq_id}", field="seq_id")


def _check_optimizer(config: dict[str, Any] | None) -> None:
    kind = (config or {}).get("type", "adamw")
    if kind not in SUPPORTED_OPTIMIZERS:
        raise InvalidInput(
            f"optimizer {kind!r} is not supported by this server; supported: {list(SUPPORTED_OPTIMIZERS)}",
            field="optimizer_config",
        )


@dataclass(frozen=True)
class OpRun:
    """What an op needs of its run row (a read-only view, shared through the read cache)."""

    id: str
    org_id: str
    status: str
    status_reason: str | None
    deployment_id: str | None
    base_model: str
    init_path: str | None
    lora_rank: int

    @classmethod
    def of(cls, run: Run) -> OpRun:
        return cls(*(getattr(run, f.name) for f in fields(cls)))


# the view's columns, named by its fields
_OP_RUN = select(*(getattr(Run, f.name) for f in fields(OpRun)))


def storage_prefix(run: OpRun | Run, kind: str, name: str) -> str:
    """Where a checkpoint's files go. Unique per save (a random suffix): an overwritten name
    gets a new prefix, so an adapter name a sampler cached never changes content."""
    return f"checkpoints/{run.org_id}/{run.id}/{kind}/{name}-{secrets.token_hex(4)}"


class TrainingOps:
    def __init__(self, runtime: Runtime) -> None:
        self.r = runtime
        self.queue = TrainerQueue(runtime.redis)

    # ---- model lookup -------------------------------------------------------------------
    async def owned_run(self, principal: Principal, model_id: str) -> OpRun:
        """What ops need of the training model's run; 404 when unknown or another org's.
        Through the process's read cache (control_plane/db/read_cache.py: dropped within
        milliseconds of any write to the run), so a training loop's ops read no database; a run
        that ended meanwhile is caught by the enqueue (:meth:`TrainerQueue.end_run`)."""

        async def load() -> OpRun | None:
            async with self.r.db.session() as s:
                row = (await s.execute(_OP_RUN.where(Run.id == model_id, Run.org_id == principal.org_id))).one_or_none()
            return OpRun(*row) if row is not None else None

        run = await self.r.db.read_cache.get_or_load(model_id, ("op_run", principal.org_id), load)
        if run is None:
            raise NotFound("model", model_id)
        return run

    async def live_run(self, principal: Principal, model_id: str) -> OpRun:
        run = await self.owned_run(principal, model_id)
        if Status(run.status) in TERMINAL:
            reason = f": {run.status_reason}" if run.status_reason else ""
            # 410, not 409: the SDK retries 409s, and a dead model does not come back
            raise Gone(f"model {model_id!r} is {run.status}{reason}; create a new training client")
        return run

    async def _submit(self, run: OpRun, seq_id: int, kind: OpKind, body: bytes) -> Submitted:
        # the op's activity (wakes a sleeping trainer) needs nothing of the enqueue: both round
        # trips at once (the controller also wakes a sleeping trainer that has ops waiting)
        (rid, is_new), _ = await asyncio.gather(
            self.queue.submit(
                run.id,
                run.id,
                seq_id,
                kind,
                body,
                org_id=run.org_id,
                max_inflight=self.r.settings.max_inflight_futures_per_org,
            ),
            op_arrived(self.r, run.id, run.deployment_id, run.status),
        )
        if is_new and seq_id == 0:
            await self.r.kick_controller()
        return Submitted(rid, run.id)

    async def _repeat(self, principal: Principal, model_id: str, seq_id: int) -> Submitted | None:
        """:meth:`_claimed`, for a caller that has not checked the model is the principal's."""
        again = await self._claimed(model_id, seq_id)
        if again is not None:
            await self.owned_run(principal, model_id)
        return again

    # ---- creating models ----------------------------------------------------------------
    async def create_model(
        self,
        principal: Principal,
        *,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora: LoraRequest,
        optimizer_config: dict[str, Any] | None,
        user_metadata: dict[str, Any] | None,
    ) -> Submitted:
        model_id, again = await self._claim_model_id(principal, session_id, model_seq_id)
        if again is not None:
            return again
        _check_optimizer(optimizer_config)
        if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
            raise InvalidInput("at least one of train_attn, train_mlp, train_unembed must be true", field="lora_config")
        checkpointing = run_options.activation_checkpointing_from_metadata(user_metadata)
        run = await self._ensure_run(
            principal, model_id, session_id, model_seq_id, base_model, asdict(lora), user_metadata, checkpointing
        )
        body = op_bodies.CreateBody(
            lora=op_bodies.LoraSpec(**asdict(lora)), activation_checkpointing=run.activation_checkpointing
        )
        return await self._submit(OpRun.of(run), 0, OpKind.CREATE, op_bodies.encode(body))

    async def create_from_state(
        self,
        principal: Principal,
        *,
        session_id: str,
        model_seq_id: int,
        path: str,
        optimizer: bool,
        base_model: str | None,
        optimizer_config: dict[str, Any] | None,
        user_metadata: dict[str, Any] | None,
    ) -> Submitted:
        """create-via-load: the new model's seq 0 restores a ``weights`` checkpoint."""
        model_id, again = await self._claim_model_id(principal, session_id, model_seq_id)
        if again is not None:
            return again
        if not optimizer:
            _check_optimizer(optimizer_config)
        checkpointing = run_options.activation_checkpointing_from_metadata(user_metadata)
        ckpt = await self._weights_checkpoint(principal, path)
        if base_model is not None and base_model != ckpt.base_model:
            raise InvalidInput(
                f"checkpoint {path!r} was trained on {ckpt.base_model}, not {base_model}", field="base_model"
            )
        run = await self._ensure_run(
            principal,
            model_id,
            session_id,
            model_seq_id,
            ckpt.base_model,
            dict(ckpt.lora_config or {}),
            user_metadata,
            checkpointing,
            init_path=path,
        )
        body = op_bodies.LoadWeightsBody(
            storage_prefix=ckpt.storage_prefix,
            tinker_path=path,
            optimizer=optimizer,
            activation_checkpointing=run.activation_checkpointing,
        )
        return await self._submit(OpRun.of(run), 0, OpKind.LOAD_WEIGHTS, op_bodies.encode(body))

    async def _claim_model_id(
        self, principal: Principal, session_id: str, model_seq_id: int
    ) -> tuple[str, Submitted | None]:
        """The model id the SDK also computes itself, and the existing future if seq 0 of that
        model was already submitted (a retried create)."""
        if model_seq_id < 0:
            raise InvalidInput("model_seq_id must be >= 0", field="model_seq_id")
        model_id = training_model_id(session_id, model_seq_id)
        return model_id, await self._repeat(principal, model_id, 0)

    async def _ensure_run(
        self,
        principal: Principal,
        model_id: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora_config: dict[str, Any],
        user_metadata: dict[str, Any] | None,
        activation_checkpointing: str | None,
        init_path: str | None = None,
    ) -> Run:
        """The run row of a Tinker training model (created once; a retry finds it).
        ``activation_checkpointing``: the mode ``user_metadata`` chose (None: none)."""
        req = runs_svc.RunRequest(
            session_id=session_id,
            base_model=base_model,
            lora_rank=int(lora_config.get("rank", 32)),
            seed=lora_config.get("seed"),
            with_sampler=False,
            origin="tinker",
            run_id=model_id,
            model_seq_id=model_seq_id,
            lora_config=lora_config,
            user_metadata=user_metadata,
            activation_checkpointing=activation_checkpointing,
        )
        async with self.r.db.transaction() as s:
            existing = await s.get(Run, model_id)
            if existing is not None:
                if existing.org_id != principal.org_id:
                    raise NotFound("session", session_id)
                return existing
            async with admission.run(s, self.r.settings, self.r.catalog, principal.org_id):
                run = (
                    await runs_svc.create_run(
                        s, principal, self.r.catalog, req, self.r.settings.run_scale_down_delay_seconds
                    )
                ).run
            run.init_path = init_path
        return run

    async def _weights_checkpoint(self, principal: Principal, path: str) -> Checkpoint:
        async with self.r.db.session() as s:
            ckpt = await runs_svc.resolve_weights_checkpoint(s, principal, path, field="path")
        return ckpt

    # ---- ops on a live model ------------------------------------------------------------
    async def _op(
        self,
        principal: Principal,
        model_id: str,
        seq_id: int,
        build: Callable[[OpRun], Awaitable[tuple[OpKind, bytes]]],
    ) -> Submitted:
        """Claim ``(model_id, seq_id)`` and enqueue what ``build`` validates and encodes.

        The SDK numbers ops itself and never re-uses a number, and the worker runs them
        strictly in order: an op rejected here must still fill its slot, or every later op of
        the model would wait for it forever. So a rejection is enqueued as a ``rejected`` op
        (the worker skips it), its future fails with the same message, and the client gets
        the 4xx.
        """
        _check_seq(seq_id)
        # A repeated submission is answered as the first was, whatever validating it again
        # says (an HTTP retry of a save whose name now exists, of an op on a run that ended
        # since); the common case, a new op, is told apart by the enqueue itself, so the claim
        # is read only when a check fails. (NotFound of the model itself is not such a case:
        # nothing of another org's model is shown, a claim on it included.)
        try:
            run = await self.live_run(principal, model_id)
        except Gone:
            if (again := await self._claimed(model_id, seq_id)) is not None:
                return again
            raise
        try:
            kind, body = await build(run)
        except DomainError as exc:
            if (again := await self._claimed(model_id, seq_id)) is not None:
                return again
            if isinstance(exc, InvalidInput):
                await self._reject(run, seq_id, exc)
            raise
        return await self._submit(run, seq_id, kind, body)

    async def _claimed(self, model_id: str, seq_id: int) -> Submitted | None:
        rid = await self.queue.claimed(model_id, seq_id)
        return Submitted(rid, model_id) if rid is not None else None

    async def _reject(self, run: OpRun, seq_id: int, exc: DomainError) -> None:
        rid, is_new = await self.queue.submit(
            run.id, run.id, seq_id, OpKind.REJECTED, exc.message.encode(), org_id=run.org_id
        )
        if is_new:
            await self.queue.complete(run.id, rid, FutureResult.failed(exc.message, ErrorCategory.USER))

    async def forward_backward(self, principal: Principal, raw: bytes, content_encoding: str | None) -> Submitted:
        body = decode_body(raw, content_encoding, self.r.settings.request_body_limit_bytes)
        req = pb.ForwardBackwardRequest()
        try:
            req.ParseFromString(body)
        except DecodeError as exc:
            raise InvalidInput(f"body is not a ForwardBackwardRequest protobuf: {exc}") from exc
        if not req.model_id:
            raise InvalidInput("model_id is required", field="model_id")

        async def build(_run: OpRun) -> tuple[OpKind, bytes]:
            if not req.loss_fn:
                raise InvalidInput("loss_fn is required", field="loss_fn")
            if len(req.data) == 0:
                raise InvalidInput("data must contain at least one datum", field="data")
            for i, datum in enumerate(req.data):
                if len(datum.model_input) == 0:
                    raise InvalidInput(f"data[{i}].model_input is empty", field="data")
            return OpKind.FORWARD_BACKWARD, body

        return await self._op(principal, req.model_id, req.seq_id, build)

    async def optim_step(
        self,
        principal: Principal,
        *,
        model_id: str,
        seq_id: int,
        adam: dict[str, Any] | None,
        optimizer_params: dict[str, Any] | None,
    ) -> Submitted:
        async def build(_run: OpRun) -> tuple[OpKind, bytes]:
            if optimizer_params is not None:
                kind = optimizer_params.get("type", "?")
                raise InvalidInput(
                    f"optimizer {kind!r} is not supported by this server; send adam_params (AdamW)",
                    field="optimizer_params",
                )
            spec = adam_spec(adam or {})
            return OpKind.OPTIM_STEP, op_bodies.encode(op_bodies.OptimStepBody(adam=spec))

        return await self._op(principal, model_id, seq_id, build)

    async def save(
        self,
        principal: Principal,
        *,
        model_id: str,
        seq_id: int,
        kind: str,
        name: str | None,
        sampling_session_seq_id: int | None,
        overwrite: bool,
        ttl_seconds: int | None,
        user_metadata: dict[str, Any] | None,
        encrypt_to: list[str] | None = None,
    ) -> Submitted:
        async def build(run: OpRun) -> tuple[OpKind, bytes]:
            if encrypt_to:
                raise InvalidInput(
                    "age_encryption_recipients is not supported by this server: exports are not encrypted",
                    field="age_encryption_recipients",
                )
            if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
                raise InvalidInput(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS}", field="ttl_seconds")
            if name is not None:
                try:
                    validate_name(name)
                except PathError as exc:
                    raise InvalidInput(str(exc), field="path") from exc
            elif kind in ("weights", "external_weights"):
                raise InvalidInput(f"{SAVE_OPS[kind].value} needs a checkpoint name in 'path'", field="path")
            elif sampling_session_seq_id is None or sampling_session_seq_id < 0:
                raise InvalidInput(
                    "an unnamed save_weights_for_sampler needs sampling_session_seq_id >= 0",
                    field="sampling_session_seq_id",
                )
            if name is not None and not overwrite:
                ref = CheckpointRef(run.id, kind, name)
                async with self.r.db.session() as s:
                    exists = await ckpt_svc.find_by_ref(s, run.org_id, ref)
                if exists is not None:  # a 400 (the SDK would retry a 409)
                    raise InvalidInput(
                        f"checkpoint {ref.tinker_path} already exists (pass overwrite=true to replace it)", field="path"
                    )
            label = name if name is not None else snapshot_name(sampling_session_seq_id)
            body = op_bodies.SaveBody(
                checkpoint_kind=kind,
                storage_prefix=storage_prefix(run, kind, label),
                name=name,
                sampling_session_seq_id=sampling_session_seq_id if name is None else None,
                ttl_seconds=ttl_seconds,
                user_metadata={str(k): str(v) for k, v in (user_metadata or {}).items()} or None,
            )
            return SAVE_OPS[kind], op_bodies.encode(body)

        return await self._op(principal, model_id, seq_id, build)

    async def load(self, principal: Principal, *, model_id: str, seq_id: int, path: str, optimizer: bool) -> Submitted:
        async def build(run: OpRun) -> tuple[OpKind, bytes]:
            ckpt = await self._weights_checkpoint(principal, path)
            if ckpt.base_model != run.base_model:
                raise InvalidInput(
                    f"checkpoint {path!r} was trained on {ckpt.base_model}, but model {model_id!r} is {run.base_model}",
                    field="path",
                )
            body = op_bodies.LoadWeightsBody(storage_prefix=ckpt.storage_prefix, tinker_path=path, optimizer=optimizer)
            return OpKind.LOAD_WEIGHTS, op_bodies.encode(body)

        return await self._op(principal, model_id, seq_id, build)


# the trainer op that writes each checkpoint kind
SAVE_OPS = {
    "weights": OpKind.SAVE_WEIGHTS,
    "sampler_weights": OpKind.SAVE_WEIGHTS_FOR_SAMPLER,
    "external_weights": OpKind.SAVE_WEIGHTS_EXTERNAL,
}


def adam_spec(p: dict[str, Any]) -> op_bodies.AdamSpec:
    """AdamW hyper-parameters with the SDK's defaults, each checked for a sane range."""
    d = op_bodies.AdamSpec()
    vals: dict[str, float] = {}
    for key in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        raw = p.get(key, getattr(d, key))
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise InvalidInput(f"adam_params.{key} must be a finite number", field=f"adam_params.{key}")
        vals[key] = float(raw)
    checks = (
        ("learning_rate", vals["learning_rate"] >= 0, ">= 0"),
        ("beta1", 0 <= vals["beta1"] < 1, "in [0, 1)"),
        ("beta2", 0 <= vals["beta2"] < 1, "in [0, 1)"),
        ("eps", vals["eps"] > 0, "> 0"),
        ("weight_decay", vals["weight_decay"] >= 0, ">= 0"),
        ("grad_clip_norm", vals["grad_clip_norm"] >= 0, ">= 0 (0 disables clipping)"),
    )
    for key, ok, rule in checks:
        if not ok:
            raise InvalidInput(f"adam_params.{key} must be {rule}, got {vals[key]}", field=f"adam_params.{key}")
    return op_bodies.AdamSpec(**vals)


def decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The request body, decompressed; at most ``limit`` bytes (the request body cap) either
    way. A zstd frame is checked before and while it is decompressed: one that declares a
    larger content size is refused unread, and decompression stops as soon as the output
    passes the cap (a 400 naming the body, as for any body this server cannot take)."""
    enc = (content_encoding or "").strip().lower()
    if enc in ("", "identity"):
        return raw
    if enc != "zstd":
        raise InvalidInput(
            f"unsupported Content-Encoding {content_encoding!r}; use zstd or none", field="Content-Encoding"
        )
    too_large = f"the decompressed body exceeds the {limit}-byte limit"
    try:
        declared = zstandard.frame_content_size(raw)
    except zstandard.ZstdError as exc:
        raise InvalidInput(f"body is not valid zstd: {exc}", field="body") from exc
    if declared > limit:
        raise InvalidInput(too_large, field="body")
    out = bytearray()
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    try:
        with reader:
            while chunk := reader.read(ZSTD_READ_CHUNK):
                out += chunk
                if len(out) > limit:
                    raise InvalidInput(too_large, field="body")
    except zstandard.ZstdError as exc:
        raise InvalidInput(f"body is not valid zstd: {exc}", field="body") from exc
    return bytes(out)
