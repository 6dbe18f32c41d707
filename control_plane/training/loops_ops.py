"""The Loops trainer data plane: validate an op, hand it to the run's worker, answer polls.

A Loops client talks to its run's deployment (``run.base_url``): every request names the run
(``X-Run-Id``), which must be the run the deployment executes. Ops reach the same op stream
and worker as Tinker ops (:mod:`control_plane.training.loops_queue` maps the client's seq ids
and idempotency keys); results are JSON in Loops' shapes (the worker and the completion
consumer write them, the op's dialect says which shape).

An op the server refuses (bad input) still fills its seq slot, as a ``rejected`` op whose
future fails with the same message, or every later op of the run would wait for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from control_plane.auth.principal import Principal
from control_plane.db.models import Deployment, Run
from control_plane.errors import Conflict, DomainError, Gone, InvalidInput, NotFound
from control_plane.scaling.wake import op_arrived, request_wake
from control_plane.services import runs as runs_svc
from control_plane.statuses import TERMINAL, Status
from control_plane.training import loops_wire as w
from control_plane.training.loops_queue import KeyReused, LoopsQueue, SeqTaken
from control_plane.training.ops import MAX_SEQ_ID, MAX_TTL_SECONDS, adam_spec, storage_prefix
from control_plane.training.queue import TrainerQueue, read_hash
from data_plane.wire import op_bodies
from data_plane.wire import queue as q
from data_plane.wire.paths import PathError, parse_checkpoint_path, validate_name

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
ERROR_CLASS = {q.ErrorCategory.USER: "UserError", q.ErrorCategory.SERVER: "ServerError"}


@dataclass(frozen=True, slots=True)
class Target:
    """The run an op is for, on the deployment the client addressed."""

    deployment: Deployment
    run: Run


@dataclass(frozen=True, slots=True)
class PollAnswer:
    status_code: int  # 200 done or failed, 408 still pending
    body: bytes


class LoopsTrainerOps:
    def __init__(self, runtime: Runtime) -> None:
        self.r = runtime
        self.queue = LoopsQueue(runtime.redis)

    # ---- addressing --------------------------------------------------------------------------
    async def target(self, principal: Principal, deployment_id: str, run_id: str | None) -> Target:
        """The deployment (404 for another org's) and the run ``X-Run-Id`` names on it.

        Every op and poll asks, so the pair comes through the process's read cache (keyed by
        the run: any write to the run row drops it within milliseconds). The deployment's
        fields that ops use (id, org, base model) never change; its status, which may, is read
        fresh where it matters (:meth:`health`). The rows are shared read-only views: nothing
        changes them. A run that ended meanwhile is caught by the enqueue
        (:meth:`TrainerQueue.end_run`)."""
        if not run_id:
            raise InvalidInput("name the run this request is for in the X-Run-Id header", field="X-Run-Id")

        async def load() -> Target | tuple[str, str]:
            async with self.r.db.session() as s:
                dep = await s.get(Deployment, deployment_id)
                if dep is None or dep.org_id != principal.org_id:
                    return ("deployment", deployment_id)
                run = await s.get(Run, run_id)
            if run is None or run.org_id != principal.org_id:
                return ("run", run_id)
            if run.deployment_id != dep.id:
                return ("run", f"{run_id} on deployment {deployment_id}")
            return Target(dep, run)

        # a miss is cached too (as what is missing): the row's INSERT would drop it
        got = await self.r.db.read_cache.get_or_load(run_id, ("loops_target", principal.org_id, deployment_id), load)
        if isinstance(got, tuple):
            raise NotFound(*got)
        return got

    @staticmethod
    def live(t: Target) -> None:
        """410 for a run that ended (replaced, deactivated, failed): it never comes back."""
        status = Status(t.run.status)
        if status in TERMINAL or status == Status.DEACTIVATING:
            reason = f": {t.run.status_reason}" if t.run.status_reason else ""
            raise Gone(f"run {t.run.id} is {status.value}{reason}; create a new training client")

    async def health(self, t: Target, base_model: str | None) -> tuple[bool, str]:
        """Whether the deployment's trainer executes the run now (and why not)."""
        if base_model and base_model != t.deployment.base_model:
            raise NotFound(
                "model", f"{base_model} on deployment {t.deployment.id} (it trains {t.deployment.base_model})"
            )
        self.live(t)
        async with self.r.db.session() as s:  # fresh: the cached view may predate a scale-down
            dep_status = (
                await s.execute(select(Deployment.status).where(Deployment.id == t.deployment.id))
            ).scalar_one_or_none()
        if dep_status == Status.SCALED_TO_ZERO.value:
            # a client that checks whether its trainer is up means to use it: wake it (an awake
            # trainer's health checks are not activity, so polling them keeps nothing up)
            await request_wake(self.r, "deployment", t.deployment.id)
            return False, f"run {t.run.id} was scaled to zero and is waking up"
        worker = await read_hash(self.r.redis, q.worker_state_key(t.deployment.id))
        state = await read_hash(self.r.redis, q.run_state_key(t.run.id))
        ready = (
            t.run.status == Status.ACTIVE.value
            and worker.get("state") == q.WorkerState.READY.value
            and worker.get("run_id") == t.run.id
            and state.get("state") == q.RunState.ATTACHED.value
        )
        return ready, f"run {t.run.id} is {t.run.status}"

    async def policy_version(self, t: Target) -> int:
        """The optimizer steps the run's adapter has taken (the worker's count)."""
        state = await read_hash(self.r.redis, q.run_state_key(t.run.id))
        return int(state.get("optim_steps") or 0)

    # ---- ops ----------------------------------------------------------------------------------
    async def submit(
        self, principal: Principal, t: Target, op: str, raw: bytes, operation_id: str | None, body: w._Op | None = None
    ) -> str:
        """Enqueue one op; returns its operation id (the idempotency key). ``body`` is ``raw``
        decoded when the caller already did (the API decodes it at the edge)."""
        if not operation_id:
            raise InvalidInput("every op needs an Idempotency-Key header (the SDK sends one)", field="Idempotency-Key")
        if not IDEMPOTENCY_KEY_RE.match(operation_id):
            raise InvalidInput("Idempotency-Key must be 1-128 characters of [A-Za-z0-9._:-]", field="Idempotency-Key")
        fingerprint = hashlib.sha256(op.encode() + b"\0" + raw).hexdigest()[:32]
        try:
            if body is None:
                body = w.decode(op, raw)
            if not 1 <= body.seq_id <= MAX_SEQ_ID:
                raise InvalidInput(f"seq_id must be between 1 and {MAX_SEQ_ID}, got {body.seq_id}", field="seq_id")
            if body.run_id is not None and body.run_id != t.run.id:
                raise InvalidInput(
                    f"run_id {body.run_id!r} differs from the X-Run-Id header {t.run.id!r}", field="run_id"
                )
            self.live(t)
            kind, payload = await self._build(t, op, body)
        except DomainError as exc:
            # a retry of an accepted op is the same operation whatever checking it again says;
            # a new op (the common case) is told apart by the enqueue script, at no extra trip
            existing = await self.queue.lookup(t.run.id, operation_id)
            if existing is not None:
                if existing[1] != fingerprint:
                    raise Conflict(f"Idempotency-Key {operation_id!r} was used for a different request") from None
                return operation_id
            if body is not None and 1 <= body.seq_id <= MAX_SEQ_ID:
                await self._reject(t, operation_id, body, op, fingerprint, exc)
            raise
        # the op's activity (wakes a sleeping trainer) needs nothing of the enqueue: both at once
        await asyncio.gather(
            self._enqueue(t, operation_id, body.seq_id, kind, payload, fingerprint, op),
            op_arrived(self.r, t.run.id, t.deployment.id, t.run.status),
        )
        return operation_id

    async def _enqueue(
        self, t: Target, operation_id: str, seq_id: int, kind: q.OpKind, payload: bytes, fingerprint: str, op: str
    ) -> None:
        try:
            await self.queue.submit(
                run_id=t.run.id,
                operation_id=operation_id,
                seq_id=seq_id,
                kind=kind,
                body=payload,
                org_id=t.run.org_id,
                fingerprint=fingerprint,
                starts_client=op == "init_trainer_server",
                max_inflight=self.r.settings.max_inflight_futures_per_org,
            )
        except KeyReused:
            raise Conflict(f"Idempotency-Key {operation_id!r} was used for a different request") from None
        except SeqTaken as exc:
            raise Conflict(
                f"seq_id {seq_id} of run {t.run.id} (trainer seq {exc.worker_seq}) belongs to another operation: "
                "only one training client at a time can drive a run"
            ) from None

    async def _reject(
        self, t: Target, operation_id: str, body: w._Op, op: str, fingerprint: str, exc: DomainError
    ) -> None:
        """Fill the refused op's seq slot and fail its future with the same message."""
        try:
            await self.queue.submit(
                run_id=t.run.id,
                operation_id=operation_id,
                seq_id=body.seq_id,
                kind=q.OpKind.REJECTED,
                body=exc.message.encode(),
                org_id=t.run.org_id,
                fingerprint=fingerprint,
                starts_client=op == "init_trainer_server",
            )
        except (KeyReused, SeqTaken):
            return
        rid = await self.queue.request_id(t.run.id, operation_id)
        if rid is not None:
            await TrainerQueue(self.r.redis).complete(
                t.run.id, rid, q.FutureResult.failed(exc.message, q.ErrorCategory.USER)
            )

    async def _build(self, t: Target, op: str, body: w._Op) -> tuple[q.OpKind, bytes]:
        run = t.run
        if isinstance(body, w.InitBody):
            if body.lora_rank != run.lora_rank:
                raise InvalidInput(
                    f"lora_rank {body.lora_rank} differs from the run's {run.lora_rank}", field="lora_rank"
                )
            if body.base_model and body.base_model != run.base_model:
                raise InvalidInput(
                    f"base_model {body.base_model!r} differs from the run's {run.base_model!r}", field="base_model"
                )
            return q.OpKind.INIT_TRAINER, op_bodies.encode(op_bodies.InitTrainerBody(lora_rank=body.lora_rank))
        if isinstance(body, w.ForwardBody):
            return q.OpKind.FORWARD_BACKWARD, w.forward_request(body, forward_only=op == "forward")
        if isinstance(body, w.OptimBody):
            return q.OpKind.OPTIM_STEP, op_bodies.encode(op_bodies.OptimStepBody(adam=adam_spec(body.adam_params)))
        if isinstance(body, w.SaveBody):
            return self._save(run, op, body)
        assert isinstance(body, w.LoadBody)
        return q.OpKind.LOAD_WEIGHTS, await self._load(run, op, body)

    def _save(self, run: Run, op: str, body: w.SaveBody) -> tuple[q.OpKind, bytes]:
        try:
            validate_name(body.name)
        except PathError as exc:
            raise InvalidInput(str(exc), field="name") from exc
        if body.ttl_seconds is not None and not 1 <= body.ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidInput(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS}", field="ttl_seconds")
        kind = "weights" if op == "save_state" else "sampler_weights"
        save = op_bodies.SaveBody(
            checkpoint_kind=kind,
            storage_prefix=storage_prefix(run, kind, body.name),
            name=body.name,
            ttl_seconds=body.ttl_seconds,
            publish=kind == "sampler_weights" and body.bump_version,
        )
        return (q.OpKind.SAVE_WEIGHTS if kind == "weights" else q.OpKind.SAVE_WEIGHTS_FOR_SAMPLER), op_bodies.encode(
            save
        )

    async def _load(self, run: Run, op: str, body: w.LoadBody) -> bytes:
        optimizer = op == "load_state_with_optimizer"
        try:
            parse_checkpoint_path(body.path)
        except PathError as exc:
            raise InvalidInput(
                f"{exc}; this server loads only its own checkpoints (the paths save_state returns)", field="path"
            ) from exc
        kinds = ("weights",) if optimizer else ("weights", "sampler_weights")
        principal = Principal(run.org_id, run.created_by, None, frozenset())
        async with self.r.db.session() as s:
            ckpt = await runs_svc.resolve_weights_checkpoint(s, principal, body.path, field="path", kind=kinds)
        if ckpt.base_model != run.base_model:
            raise InvalidInput(
                f"checkpoint {body.path!r} was trained on {ckpt.base_model}, not {run.base_model}", field="path"
            )
        ref = parse_checkpoint_path(body.path)
        return op_bodies.encode(
            op_bodies.LoadWeightsBody(
                storage_prefix=ckpt.storage_prefix, tinker_path=ref.tinker_path, optimizer=optimizer
            )
        )

    # ---- results --------------------------------------------------------------------------------
    async def poll(self, principal: Principal, t: Target, operation_id: str) -> PollAnswer:
        """Long-poll an op (up to ``future_poll_timeout_seconds``): 408 while pending."""
        rid = await self.queue.request_id(t.run.id, operation_id)
        if rid is None:
            raise NotFound("operation", operation_id)
        cur = await self.r.futures.wait(rid, self.r.settings.future_poll_timeout_seconds, org_id=principal.org_id)
        if cur is None:
            raise NotFound("operation", operation_id)
        if cur.state == q.FutureState.PENDING:
            return PollAnswer(408, json.dumps({"status": "pending", "operation_id": operation_id}).encode())
        if cur.state == q.FutureState.FAILED:
            err = json.loads(cur.body or b"{}")
            cls = ERROR_CLASS.get(cur.category or q.ErrorCategory.SERVER, "ServerError")
            return PollAnswer(
                200,
                json.dumps(
                    {"status": "error", "error": err.get("error", "unknown error"), "error_class": cls}
                ).encode(),
            )
        if cur.content_type != q.JSON_CONTENT:
            return PollAnswer(
                200,
                json.dumps(
                    {
                        "status": "error",
                        "error": "this operation's result is not a Loops result",
                        "error_class": "ServerError",
                    }
                ).encode(),
            )
        return PollAnswer(200, b'{"status":"done","result":' + (cur.body or b"{}") + b"}")
