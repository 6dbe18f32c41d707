"""The trainer worker's Redis loop (the contract is :mod:`data_plane.wire.queue`).

Lifecycle in ``worker_state_key(run_id)`` (fields ``state``, ``pid``, ``updated_at``, plus
``detail``, ``model_id``, ``next_seq``):

- ``loading`` at start, while the base model loads;
- ``ready`` once the base model is loaded (before seq 0 runs); a background thread refreshes
  ``updated_at`` every :data:`HEARTBEAT_S` seconds, also during long ops, and ``next_seq`` is
  written after every op;
- ``failed`` with ``detail`` if the base model cannot be loaded, if Redis stays unreachable, or
  if this run's state hash shows ops already executed by an earlier process (a restarted
  worker would train from a reset state: it refuses instead);
- ``stopped`` after a ``shutdown`` op or SIGTERM/SIGINT.

Ops are read with ``XREAD`` from the start of ``ops_stream(run_id)``, buffered by ``seq_id``
and executed strictly in order from 0. ``shutdown`` acts on arrival (not in seq order): ops
still waiting for a gap get failed futures (category ``server``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from typing import Any

import redis

from data_plane.storage.base import StoreError
from data_plane.trainer.errors import UserError
from data_plane.trainer.ordering import SeqBuffer
from data_plane.wire import op_bodies
from data_plane.wire.queue import (
    COMPLETIONS_STREAM,
    FUTURE_DONE_CHANNEL,
    FUTURE_TTL_SECONDS,
    Completion,
    ErrorCategory,
    FutureResult,
    OpEnvelope,
    OpKind,
    WorkerState,
    future_key,
    ops_stream,
    run_pending_key,
    worker_state_key,
)
from data_plane.wire.worker_config import TrainerLaunch

log = logging.getLogger("openloops.trainer")

HEARTBEAT_S = 5.0
XREAD_BLOCK_MS = 1000
XREAD_COUNT = 64
REDIS_GIVE_UP_S = 120.0
SAVE_KINDS = (OpKind.SAVE_WEIGHTS, OpKind.SAVE_WEIGHTS_FOR_SAMPLER)


def redis_url(url: str) -> str:
    """redis-py only knows ``redis://``/``rediss://``; Valkey's schemes mean the same."""
    for scheme, replacement in (("valkey://", "redis://"), ("valkeys://", "rediss://")):
        if url.startswith(scheme):
            return replacement + url[len(scheme):]
    return url


def _redacted(url: str) -> str:
    """The URL without a password (for logs)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def _classify(exc: BaseException) -> tuple[str, ErrorCategory]:
    if isinstance(exc, UserError):
        return str(exc), ErrorCategory.USER
    if isinstance(exc, StoreError):
        return f"object store error: {exc}", ErrorCategory.SERVER
    return f"{type(exc).__name__}: {exc}", ErrorCategory.SERVER


class Worker:
    def __init__(self, launch: TrainerLaunch, client: redis.Redis | None = None, store=None) -> None:
        self.launch = launch
        self.r = client or redis.Redis.from_url(redis_url(launch.redis_url))
        self.store = store
        self.buffer: SeqBuffer[OpEnvelope] = SeqBuffer()
        self.model = None  # TrainingModel once the base is loaded
        self.seq0_error: tuple[str, ErrorCategory] | None = None
        self.stopping = False
        self.last_id = "0"
        self.entry_ids: dict[int, str] = {}  # seq -> stream entry id, deleted once executed
        self._beat_stop = threading.Event()

    # ---- redis helpers ------------------------------------------------------------------
    def set_state(self, state: WorkerState, detail: str | None = None) -> None:
        fields: dict[str, Any] = {
            "state": state.value,
            "pid": os.getpid(),
            "updated_at": f"{time.time():.3f}",
            "model_id": self.launch.model_id,
            "next_seq": self.buffer.next_seq,
        }
        if detail is not None:
            fields["detail"] = detail[:4000]
        p = self.r.pipeline(transaction=True)
        if detail is None:
            p.hdel(worker_state_key(self.launch.run_id), "detail")
        p.hset(worker_state_key(self.launch.run_id), mapping=fields)
        p.execute()

    def progress(self) -> None:
        """Record how far the sequence got (also what the restart check reads)."""
        fields = {"updated_at": f"{time.time():.3f}", "next_seq": self.buffer.next_seq}
        self._retrying("worker state", lambda: self.r.hset(worker_state_key(self.launch.run_id), mapping=fields))

    def _heartbeat(self) -> None:
        key = worker_state_key(self.launch.run_id)
        while not self._beat_stop.wait(HEARTBEAT_S):
            try:
                self.r.hset(key, "updated_at", f"{time.time():.3f}")
            except redis.RedisError as exc:  # the main loop handles outages
                log.debug("heartbeat failed: %s", exc)

    def _retrying(self, what: str, fn) -> None:
        """Run a Redis write, retrying through an outage of up to :data:`REDIS_GIVE_UP_S`
        (a result must not be lost because Redis blinked); then re-raise."""
        deadline = time.monotonic() + REDIS_GIVE_UP_S
        while True:
            try:
                fn()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("redis error writing %s (%s); retrying", what, exc)
                time.sleep(1.0)

    def _trim(self, entry_id: str) -> None:
        """Delete an executed (or duplicate) op from the stream: forward_backward bodies are
        megabytes, and a restarted worker never replays a run's ops anyway."""
        try:
            self.r.xdel(ops_stream(self.launch.run_id), entry_id)
        except redis.RedisError as exc:  # best effort: the stream only grows until the next trim
            log.warning("could not trim op %s: %s", entry_id, exc)

    def write_result(self, request_id: str, result: FutureResult) -> None:
        def _write() -> None:
            p = self.r.pipeline(transaction=True)
            p.hset(future_key(request_id), mapping=result.to_fields())
            p.expire(future_key(request_id), FUTURE_TTL_SECONDS)
            p.srem(run_pending_key(self.launch.run_id), request_id)
            p.publish(FUTURE_DONE_CHANNEL, request_id)
            p.execute()

        self._retrying(f"future {request_id}", _write)

    def complete(self, c: Completion) -> None:
        self._retrying(f"completion {c.request_id}", lambda: self.r.xadd(COMPLETIONS_STREAM, c.to_fields()))

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> bool:
        """Load the base model; False (state ``failed``) if that or the restart check fails."""
        key = worker_state_key(self.launch.run_id)
        prev = self.r.hgetall(key)
        prev_next = int(prev.get(b"next_seq", b"0") or 0)
        if prev_next > 0:
            detail = (
                f"a previous worker of this run already executed ops up to seq {prev_next - 1}; "
                "its in-memory training state is lost, so this worker refuses to continue "
                "(restore from a checkpoint into a new run)"
            )
            self.set_state(WorkerState.FAILED, detail)
            log.error(detail)
            return False
        self.set_state(WorkerState.LOADING)
        try:
            t0 = time.perf_counter()
            self.model = self._load_model()
            log.info("base model %s loaded in %.2fs", self.launch.base_model, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            log.exception("loading the base model failed")
            self.set_state(WorkerState.FAILED, f"loading base model {self.launch.base_model!r} failed: {type(exc).__name__}: {exc}")
            return False
        self.set_state(WorkerState.READY)
        return True

    def _load_model(self):
        from data_plane.trainer.model import load_base, pick_device, pick_dtype
        from data_plane.trainer.training import TrainingModel

        if self.store is None:
            from data_plane.storage.factory import open_store

            self.store = open_store(self.launch.store)
        device = pick_device(self.launch.device)
        base = load_base(self.launch.model_source, device, pick_dtype(device))
        return TrainingModel(
            model_id=self.launch.model_id,
            base_model_name=self.launch.base_model,
            base=base,
            device=device,
            store=self.store,
            max_seq_len=self.launch.max_seq_len,
            microbatch_tokens=self.launch.microbatch_tokens,
        )

    def run(self) -> int:
        try:
            self._retrying("startup ping", self.r.ping)
            if not self.start():
                return 1
        except redis.RedisError as exc:
            log.error("redis at %s is unusable, exiting: %s", _redacted(self.launch.redis_url), exc)
            return 1
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        try:
            return self._loop()
        except redis.RedisError as exc:
            log.error("lost redis for good, exiting: %s", exc)
            return 1
        finally:
            self._beat_stop.set()

    def _loop(self) -> int:
        stream = ops_stream(self.launch.run_id)
        down_since: float | None = None
        while not self.stopping:
            try:
                resp = self.r.xread({stream: self.last_id}, count=XREAD_COUNT, block=XREAD_BLOCK_MS)
                down_since = None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > REDIS_GIVE_UP_S:
                    log.error("redis unreachable for %.0fs, exiting: %s", now - down_since, exc)
                    return 1
                log.warning("redis error (%s); retrying", exc)
                time.sleep(1.0)
                continue
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    self.accept(fields)
                    if self.stopping:
                        break
            if not self.stopping:
                self.drain()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        for _seq, env in self.buffer.take_waiting():
            self._fail(env, "the worker shut down before this op ran", ErrorCategory.SERVER)
        self.set_state(WorkerState.STOPPED)
        log.info("worker stopped")

    # ---- ops ----------------------------------------------------------------------------
    def accept(self, fields: dict[bytes, bytes]) -> None:
        try:
            env = OpEnvelope.from_fields(fields)
        except Exception as exc:  # noqa: BLE001
            log.error("dropping malformed stream entry %s: %s", self.last_id, exc)
            rid = fields.get(b"request_id")
            if rid:
                self.write_result(rid.decode(), FutureResult.failed(f"malformed op envelope: {exc}", ErrorCategory.SERVER))
            return
        if env.kind == OpKind.SHUTDOWN:
            log.info("shutdown requested (entry %s)", self.last_id)
            self.stopping = True
            return
        if env.seq_id < 0:
            self._fail(env, f"invalid seq_id {env.seq_id}", ErrorCategory.SERVER)
            return
        if env.model_id != self.launch.model_id:
            self._fail(env, f"op for model {env.model_id!r} reached the worker of {self.launch.model_id!r}", ErrorCategory.SERVER)
            return
        if not self.buffer.add(env.seq_id, env):
            log.info("ignoring duplicate seq %d (%s, request %s)", env.seq_id, env.kind.value, env.request_id)
            self._trim(self.last_id)
        else:
            self.entry_ids[env.seq_id] = self.last_id

    def drain(self) -> None:
        for seq, env in self.buffer.ready():
            t0 = time.perf_counter()
            self.execute(seq, env)
            log.info("seq %d %s done in %.3fs", seq, env.kind.value, time.perf_counter() - t0)
            self.progress()
            entry = self.entry_ids.pop(seq, None)
            if entry is not None:
                self._trim(entry)
            if self.stopping:
                break

    def execute(self, seq: int, env: OpEnvelope) -> None:
        try:
            if seq == 0:
                self._seq0(env)
            elif self.seq0_error is not None:
                msg, cat = self.seq0_error
                self._fail(env, f"the model was not created: {msg}", cat)
            else:
                self._op(seq, env)
        except redis.RedisError:
            raise  # Redis itself is gone for good: exit (the control plane fails pending futures)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failed future
            msg, cat = _classify(exc)
            if cat == ErrorCategory.SERVER:
                log.error("seq %d %s failed: %s\n%s", seq, env.kind.value, msg, traceback.format_exc())
            else:
                log.info("seq %d %s rejected: %s", seq, env.kind.value, msg)
            if seq == 0:
                self.seq0_error = (msg, cat)
            self._fail(env, msg, cat)
            _free_accelerator_memory()

    def _fail(self, env: OpEnvelope, msg: str, cat: ErrorCategory) -> None:
        if env.kind in SAVE_KINDS:
            self.complete(Completion(request_id=env.request_id, run_id=self.launch.run_id, kind=env.kind, error=msg, category=cat))
        else:
            self.write_result(env.request_id, FutureResult.failed(msg, cat))

    def _seq0(self, env: OpEnvelope) -> None:
        m = self.model
        if env.kind == OpKind.CREATE:
            result = m.create(_body(op_bodies.decode_create, env.body))
        elif env.kind == OpKind.LOAD_WEIGHTS:
            result = m.create_from_checkpoint(_body(op_bodies.decode_load, env.body))
        else:
            raise UserError(f"seq 0 must be create or load_weights, got {env.kind.value}")
        self.write_result(env.request_id, FutureResult.ok_json(result))

    def _op(self, seq: int, env: OpEnvelope) -> None:
        m = self.model
        kind = env.kind
        if kind == OpKind.REJECTED:
            log.info("seq %d was rejected by the control plane: %s", seq, env.body[:200].decode(errors="replace"))
        elif kind == OpKind.FORWARD_BACKWARD:
            self.write_result(env.request_id, FutureResult.ok_proto(m.forward_backward(env.body)))
        elif kind == OpKind.OPTIM_STEP:
            self.write_result(env.request_id, FutureResult.ok_json(m.optim_step(_body(op_bodies.decode_optim, env.body))))
        elif kind == OpKind.LOAD_WEIGHTS:
            self.write_result(env.request_id, FutureResult.ok_json(m.load(_body(op_bodies.decode_load, env.body))))
        elif kind in SAVE_KINDS:
            body = _body(op_bodies.decode_save, env.body)
            out = m.save(body, seq)
            self.complete(
                Completion(
                    request_id=env.request_id,
                    run_id=self.launch.run_id,
                    kind=kind,
                    result=out.result,
                    checkpoint_kind=body.checkpoint_kind,
                    checkpoint_name=body.name,
                    storage_prefix=body.storage_prefix,
                    files=out.files,
                    lora_config=out.lora,
                    sampling_session_seq_id=body.sampling_session_seq_id,
                    ttl_seconds=body.ttl_seconds,
                    user_metadata=body.user_metadata,
                )
            )
        elif kind == OpKind.CREATE:
            raise UserError("create is only valid as seq 0 (the model already exists)")
        else:
            raise UserError(f"unsupported op kind {kind.value}")


def _body(decode, raw: bytes):
    try:
        return decode(raw)
    except (TypeError, KeyError, ValueError) as exc:
        raise UserError(f"malformed op body: {type(exc).__name__}: {exc}") from None


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def main() -> int:
    logging.basicConfig(
        # the same variable the control plane reads (any case: "info", "WARNING", ...)
        level=os.environ.get("OPENLOOPS_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    launch = TrainerLaunch.from_env()
    worker = Worker(launch)

    def _stop(signum, _frame):
        log.info("signal %d: stopping after the current op", signum)
        worker.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return worker.run()
