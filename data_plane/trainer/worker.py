"""The trainer worker's Redis loop (the contract is :mod:`data_plane.wire.queue`).

One worker serves one deployment. It loads the base model once, then executes one run at a
time: the control plane attaches a run through ``deployment_runs_stream(deployment_id)``;
on a new attachment the worker drops the previous run's adapter and optimizer (its waiting
ops fail) and reads the new run's op stream from the start.

Deployment lifecycle in ``worker_state_key(deployment_id)`` (fields ``state``, ``pid``,
``updated_at``, ``run_id``, plus ``detail`` and ``gpus``):

- ``loading`` at start, while the base model loads;
- ``ready`` once it is loaded; a background thread refreshes ``updated_at`` (and the GPU
  figures when there is a GPU) every :data:`HEARTBEAT_S` seconds, also during long ops;
- ``failed`` with ``detail`` if the base model cannot be loaded or Redis stays unreachable;
- ``stopped`` after a ``shutdown`` op or SIGTERM/SIGINT.

Run progress in ``run_state_key(run_id)``: ``next_seq`` and ``optim_steps`` after every op,
``state`` restoring | attached | detached | failed, ``snapshot_seq`` after every snapshot,
``resumes`` (how many times a worker picked the run up after another one executed ops of it).

Runs are durable (docs/durability.md): executed ops stay in the run's op stream until a
snapshot in the object store covers them (:mod:`.snapshotter`). Attaching a run that an
earlier worker executed restores its snapshot and replays the ops logged since, in seq order;
an op whose future an earlier worker already answered is re-executed for its effect on the
state, but its answer is left as it was (a save already answered is skipped altogether). A
run whose state cannot be restored (its snapshot is unreadable, or it was executed by a worker
that kept no op log) is marked ``failed`` with a ``detail``, never trained from a reset state.

Ops are buffered by ``seq_id`` and executed strictly in order from 0. ``shutdown`` (and
SIGTERM) act on arrival: the worker finishes the op in hand, writes a final snapshot and
exits; ops still waiting stay in the log for the next worker. A run detached because another
run took over the deployment has its waiting ops failed (category ``server``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from redis.typing import KeyT, StreamIdT

from data_plane.storage.base import ObjectStore, StoreError
from data_plane.trainer import snapshots
from data_plane.trainer.errors import UserError
from data_plane.trainer.group_calls import Group
from data_plane.trainer.ordering import SeqBuffer
from data_plane.trainer.snapshotter import RunLog, SnapshotDone, Snapshotter
from data_plane.wire import op_bodies
from data_plane.wire.paths import CheckpointRef
from data_plane.wire.queue import (
    COMPLETIONS_STREAM,
    FUTURE_DONE_CHANNEL,
    FUTURE_TTL_SECONDS,
    JSON_CONTENT,
    TELEMETRY_MAXLEN,
    TELEMETRY_STREAM,
    AttachEvent,
    Completion,
    Dialect,
    ErrorCategory,
    FutureResult,
    FutureState,
    OpEnvelope,
    OpKind,
    OutFields,
    RunState,
    WorkerState,
    deployment_runs_stream,
    done_message,
    future_key,
    ops_stream,
    run_pending_key,
    run_state_key,
    stream_entries,
    text,
    worker_state_key,
    xread_streams,
)
from data_plane.wire.telemetry import OpTelemetry, TelemetryKind
from data_plane.wire.worker_config import TrainerLaunch

if TYPE_CHECKING:
    from data_plane.trainer.training import TrainingModel

T = TypeVar("T")

log = logging.getLogger("openloops.trainer")

HEARTBEAT_S = 5.0
XREAD_BLOCK_MS = 1000
XREAD_COUNT = 64
REDIS_GIVE_UP_S = 120.0
SAVE_KINDS = (OpKind.SAVE_WEIGHTS, OpKind.SAVE_WEIGHTS_FOR_SAMPLER, OpKind.SAVE_WEIGHTS_EXTERNAL)


def redis_url(url: str) -> str:
    """redis-py only knows ``redis://``/``rediss://``; Valkey's schemes mean the same."""
    for scheme, replacement in (("valkey://", "redis://"), ("valkeys://", "rediss://")):
        if url.startswith(scheme):
            return replacement + url[len(scheme) :]
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


@dataclass
class AttachedRun:
    """The run this worker executes now, and how far it got."""

    run_id: str
    max_seq_len: int
    log: RunLog
    buffer: SeqBuffer[OpEnvelope] = field(default_factory=SeqBuffer)
    last_id: str = "0"  # position in the run's op stream
    entry_ids: dict[int, str] = field(default_factory=dict)  # seq -> stream entry of a waiting op
    seq0_error: tuple[str, ErrorCategory] | None = None
    # ops below this seq were executed by an earlier worker (their answers may be out already)
    replay_until: int = 0


class Worker:
    def __init__(
        self,
        launch: TrainerLaunch,
        client: redis.Redis | None = None,
        store: ObjectStore | None = None,
        group: Group | None = None,
    ) -> None:
        self.launch = launch
        self.group = group  # the trainer's other ranks, which follow this one (None: there are none)
        self.r = client or redis.Redis.from_url(redis_url(launch.redis_url))
        self.store = store
        self.model: TrainingModel | None = None  # once the base is loaded
        self.run: AttachedRun | None = None
        self.runs_last_id = "0"  # position in the deployment's attach stream
        self.stopping = False
        self._beat_stop = threading.Event()
        self._mute: str | None = None  # request id whose answer is already out (a replayed op)
        self._progressed = False  # the current op's answer carried the run's progress
        self.snapshotter = Snapshotter(
            self._store,
            interval_s=launch.snapshot_interval_s,
            max_ops=launch.snapshot_max_ops,
            on_done=self._snapshot_done,
            owns=self._owns,
        )
        # this process's claim on the runs it attaches (a successor's claim fences it off)
        self.incarnation = f"{os.getpid()}-{secrets.token_hex(6)}"

    # ---- redis helpers ------------------------------------------------------------------
    def set_state(self, state: WorkerState, detail: str | None = None) -> None:
        fields: OutFields = {
            "state": state.value,
            "pid": os.getpid(),
            "updated_at": f"{time.time():.3f}",
            "run_id": self.run.run_id if self.run else "",
        }
        if detail is not None:
            fields["detail"] = detail[:4000]
        p = self.r.pipeline(transaction=True)
        if detail is None:
            p.hdel(worker_state_key(self.launch.deployment_id), "detail")
        p.hset(worker_state_key(self.launch.deployment_id), mapping=fields)
        p.execute()

    def set_run_state(
        self, run_id: str, state: RunState, detail: str | None = None, **extra: str | int | float
    ) -> None:
        fields: OutFields = {"state": state.value, "deployment_id": self.launch.deployment_id}
        for name, value in extra.items():
            fields[name] = value
        if detail is not None:
            fields["detail"] = detail[:4000]
        self._retrying("run state", lambda: self.r.hset(run_state_key(run_id), mapping=fields))

    def progress(self) -> None:
        """Record how far the run got (the controller's resume check reads it)."""
        run = self.run
        if run is None:
            return
        fields = self._progress_fields(run)
        self._retrying("run state", lambda: self.r.hset(run_state_key(run.run_id), mapping=fields))

    def _progress_fields(self, run: AttachedRun) -> OutFields:
        return {
            "next_seq": max(run.buffer.next_seq, run.replay_until),
            "optim_steps": self._optim_steps(),
            "updated_at": f"{time.time():.3f}",
        }

    def _store(self) -> ObjectStore:
        if self.store is None:
            from data_plane.storage.factory import open_store

            self.store = open_store(self.launch.store)
        return self.store

    def _model(self) -> TrainingModel:
        if self.model is None:
            raise RuntimeError("the base model is not loaded")
        return self.model

    def _optim_steps(self) -> int:
        m = self.model
        return int(m.optimizer_steps) if m is not None and m.created else 0

    def _heartbeat(self) -> None:
        key = worker_state_key(self.launch.deployment_id)
        while not self._beat_stop.wait(HEARTBEAT_S):
            try:
                fields: OutFields = {"updated_at": f"{time.time():.3f}"}
                gpus = _gpu_usage()
                if gpus is not None:
                    fields["gpus"] = json.dumps(gpus)
                self.r.hset(key, mapping=fields)
            except redis.RedisError as exc:  # the main loop handles outages
                log.debug("heartbeat failed: %s", exc)

    def _retrying(self, what: str, fn: Callable[[], object]) -> None:
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

    def _trim(self, run_id: str, *entry_ids: str) -> None:
        """Delete ops from the run's log: duplicates at once, executed ones once a snapshot
        covers them (forward_backward bodies are megabytes)."""
        if not entry_ids:
            return
        try:
            self.r.xdel(ops_stream(run_id), *entry_ids)
        except redis.RedisError as exc:  # best effort: a later replay skips covered ops anyway
            log.warning("could not trim %d op(s) of run %s: %s", len(entry_ids), run_id, exc)

    def _snapshot_done(self, done: SnapshotDone) -> None:
        """A snapshot is current: the ops it covers leave the log (called from its thread)."""
        self._trim(done.run_id, *done.entries)
        fields: OutFields = {
            "snapshot_seq": done.next_seq,
            "snapshot_at": f"{time.time():.3f}",
            "snapshot_seconds": f"{done.seconds:.3f}",
            "snapshot_bytes": done.size_bytes,
        }
        self.r.hset(run_state_key(done.run_id), mapping=fields)

    def _owns(self, run_id: str) -> bool:
        """Whether this process still owns ``run_id`` (a newer worker claims it on attach)."""
        try:
            owner = self.r.hget(run_state_key(run_id), "owner")
        except redis.RedisError:
            return False  # cannot tell: do nothing that a successor could contradict
        return owner is not None and text(owner) == self.incarnation

    def _answered(self, request_id: str) -> bool:
        """Whether a future already holds its answer (an earlier worker gave it)."""
        state = self.r.hget(future_key(request_id), "state")
        return state is not None and state != FutureState.PENDING.value.encode()

    def write_result(
        self, run_id: str, request_id: str, result: FutureResult, telemetry: OpTelemetry | None = None
    ) -> None:
        """Answer a future; a training op's ``telemetry`` entry goes out in the same round trip
        (a replayed op's answer, and so its telemetry, is already out: nothing is written)."""
        if request_id == self._mute:
            return  # a replayed op: the client already has its answer
        # the run's progress rides along (the op is done: its seq is behind next_seq already)
        run = self.run if self.run is not None and self.run.run_id == run_id else None
        progress = self._progress_fields(run) if run is not None else None

        def _write() -> None:
            p = self.r.pipeline(transaction=True)
            p.hset(future_key(request_id), mapping=result.to_fields())
            p.expire(future_key(request_id), FUTURE_TTL_SECONDS)
            p.srem(run_pending_key(run_id), request_id)
            p.publish(FUTURE_DONE_CHANNEL, done_message(request_id, result))
            if telemetry is not None:
                p.xadd(TELEMETRY_STREAM, telemetry.to_fields(), maxlen=TELEMETRY_MAXLEN, approximate=True)
            if progress is not None:
                p.hset(run_state_key(run_id), mapping=progress)
            p.execute()

        self._retrying(f"future {request_id}", _write)
        self._progressed = progress is not None

    def complete(self, c: Completion) -> None:
        if c.request_id == self._mute:
            return
        self._retrying(f"completion {c.request_id}", lambda: self.r.xadd(COMPLETIONS_STREAM, c.to_fields()))

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> bool:
        """Load the base model; False (state ``failed``) if that fails."""
        self.set_state(WorkerState.LOADING)
        try:
            t0 = time.perf_counter()
            self.model = self._load_model()
            log.info("base model %s loaded in %.2fs", self.launch.base_model, time.perf_counter() - t0)
        except Exception as exc:
            log.exception("loading the base model failed")
            self.set_state(
                WorkerState.FAILED, f"loading base model {self.launch.base_model!r} failed: {type(exc).__name__}: {exc}"
            )
            return False
        self._attach_latest()
        self.set_state(WorkerState.READY)
        return True

    def _load_model(self) -> TrainingModel:
        from data_plane.trainer.training import TrainingModel

        return TrainingModel.from_launch(self.launch, self._store(), self.group)

    def run_forever(self) -> int:
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
            if self.group is not None:
                self.group.stop_followers()

    def _loop(self) -> int:
        runs_stream = deployment_runs_stream(self.launch.deployment_id)
        down_since: float | None = None
        while not self.stopping:
            streams: dict[KeyT, StreamIdT] = {runs_stream: self.runs_last_id}
            run = self.run
            if run is not None:
                streams[ops_stream(run.run_id)] = run.last_id
            try:
                resp = self.r.xread(streams, count=XREAD_COUNT, block=XREAD_BLOCK_MS)
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
            attach: AttachEvent | None = None
            for stream, entries in xread_streams(resp):
                name = stream.decode() if isinstance(stream, bytes) else stream
                if name == runs_stream:
                    for entry_id, fields in entries:
                        self.runs_last_id = _id(entry_id)
                        attach = _attach_event(fields) or attach
                    continue
                for entry_id, fields in entries:
                    if run is None or self.stopping:
                        break
                    run.last_id = _id(entry_id)
                    self.accept(run, fields)
            if not self.stopping:
                self.drain()
                self._maybe_snapshot()
            if attach is not None and not self.stopping:
                self.attach(attach)
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop: the run's state goes to the object store (a final snapshot); ops still
        waiting stay in its log, for the worker that picks the run up next."""
        run = self.run
        if run is not None and self.model is not None:
            waiting = run.buffer.waiting
            if self.snapshotter.final(self.model, run.log, run.buffer.next_seq, _seq0_error(run)):
                log.info("final snapshot of run %s at seq %d", run.run_id, run.buffer.next_seq)
            else:
                log.warning("final snapshot of run %s failed: its op log still holds every op", run.run_id)
            if waiting:
                log.info("%d op(s) of run %s wait for the next worker: %s", len(waiting), run.run_id, waiting)
        else:
            self.snapshotter.wait()
        self.set_state(WorkerState.STOPPED)
        log.info("worker stopped")

    # ---- runs ---------------------------------------------------------------------------
    def _attach_latest(self) -> None:
        """At start: attach the deployment's current run (the last attach event)."""
        entries = stream_entries(self.r.xrevrange(deployment_runs_stream(self.launch.deployment_id), count=1))
        if entries:
            entry_id, fields = entries[0]
            self.runs_last_id = _id(entry_id)
            event = _attach_event(fields)
            if event is not None:
                self.attach(event)

    def attach(self, event: AttachEvent) -> None:
        """Execute ``event.run_id`` from now on (a no-op when it already is the run)."""
        if self.run is not None and self.run.run_id == event.run_id:
            return
        self._detach(f"run {event.run_id} took over this deployment")
        prev = self.r.hgetall(run_state_key(event.run_id))
        prev_next = int(prev.get(b"next_seq", b"0") or 0)
        if prev_next > 0 and prev.get(b"durable") != b"1":
            detail = (
                f"a trainer that kept no op log already executed ops of run {event.run_id} up to seq "
                f"{prev_next - 1}; its training state is lost, so this worker refuses to continue it "
                "(restore from a checkpoint into a new run)"
            )
            self._refuse(event.run_id, detail)
            return
        m = self.model
        assert m is not None
        m.bind(event.run_id, min(event.max_seq_len, self.launch.max_seq_len))
        run = AttachedRun(event.run_id, m.max_seq_len, RunLog(event.run_id, event.snapshots), replay_until=prev_next)
        # claim the run before reading its snapshot: a predecessor still draining checks the
        # claim before it moves the snapshot manifest or trims the log (snapshots.write)
        self.r.hset(run_state_key(event.run_id), "owner", self.incarnation)
        if prev_next > 0 or prev.get(b"snapshot_seq"):
            self.set_run_state(event.run_id, RunState.RESTORING, next_seq=prev_next)
            try:
                self._restore(run)
            except (snapshots.SnapshotError, StoreError) as exc:
                self._refuse(event.run_id, f"run {event.run_id} cannot be resumed: {exc}")
                return
            self.r.hincrby(run_state_key(event.run_id), "resumes", 1)
        self.run = run
        self.set_run_state(
            event.run_id,
            RunState.ATTACHED,
            next_seq=max(prev_next, run.buffer.next_seq),
            optim_steps=self._optim_steps(),
            durable=1,
        )
        self.set_state(WorkerState.READY)
        log.info("attached run %s (max_seq_len %d)", event.run_id, m.max_seq_len)

    def _refuse(self, run_id: str, detail: str) -> None:
        log.error(detail)
        self.set_run_state(run_id, RunState.FAILED, detail)
        self.set_state(WorkerState.READY if self.model is not None else WorkerState.LOADING)

    def _restore(self, run: AttachedRun) -> None:
        """Continue a run an earlier worker executed: its snapshot, then its op log."""
        m = self._model()
        t0 = time.perf_counter()
        snap = snapshots.read(self._store(), run.log.prefix, run.run_id)
        if snap is None:
            # no snapshot yet: the log still holds every op from seq 0
            log.info(
                "resuming run %s from its op log (no snapshot yet): replaying seqs 0..%d",
                run.run_id,
                run.replay_until - 1,
            )
            return
        m.restore_snapshot(snap)
        run.buffer = SeqBuffer(snap.next_seq)
        run.log.snapshot_seq = snap.next_seq
        if snap.seq0_error is not None:
            run.seq0_error = (snap.seq0_error[0], ErrorCategory(snap.seq0_error[1]))
        log.info(
            "resumed run %s from its snapshot at seq %d (optimizer step %d) in %.2fs; replaying seqs %d..%d",
            run.run_id,
            snap.next_seq,
            snap.optim_steps,
            time.perf_counter() - t0,
            snap.next_seq,
            run.replay_until - 1,
        )

    def _detach(self, why: str) -> None:
        run = self.run
        if run is None:
            return
        for seq, env in run.buffer.take_waiting():
            self._fail(run.run_id, env, f"this op did not run: {why}", ErrorCategory.SERVER)
            self._trim(run.run_id, *([run.entry_ids[seq]] if seq in run.entry_ids else []))  # answered
        if self.model is not None and self.model.created:
            self.model.detach()
        self.set_run_state(run.run_id, RunState.DETACHED, why)
        self.run = None
        log.info("detached run %s: %s", run.run_id, why)

    # ---- ops ----------------------------------------------------------------------------
    def accept(self, run: AttachedRun, fields: dict[bytes, bytes]) -> None:
        try:
            env = OpEnvelope.from_fields(fields)
        except Exception as exc:  # noqa: BLE001
            log.error("dropping malformed stream entry %s: %s", run.last_id, exc)
            rid = fields.get(b"request_id")
            if rid:
                self.write_result(
                    run.run_id, rid.decode(), FutureResult.failed(f"malformed op envelope: {exc}", ErrorCategory.SERVER)
                )
            return
        if env.kind == OpKind.SHUTDOWN:
            log.info("shutdown requested (entry %s)", run.last_id)
            self._trim(run.run_id, run.last_id)  # acted on now: the next worker must not see it
            self.stopping = True
            return
        if env.seq_id < 0:
            self._fail(run.run_id, env, f"invalid seq_id {env.seq_id}", ErrorCategory.SERVER)
            return
        if env.model_id != run.run_id:
            self._fail(
                run.run_id,
                env,
                f"op for model {env.model_id!r} reached the stream of run {run.run_id!r}",
                ErrorCategory.SERVER,
            )
            return
        if not run.buffer.add(env.seq_id, env):
            if env.seq_id >= (run.log.snapshot_seq or 0):
                log.info("ignoring duplicate seq %d (%s, request %s)", env.seq_id, env.kind.value, env.request_id)
            self._trim(run.run_id, run.last_id)
        else:
            run.entry_ids[env.seq_id] = run.last_id

    def drain(self) -> None:
        run = self.run
        if run is None or not run.buffer.has_ready:
            return
        if not self._owns(run.run_id):
            # a newer worker claimed the run (this one was replaced and is still draining):
            # leave everything to it, fail nothing
            log.warning("run %s is owned by another worker now; letting it go", run.run_id)
            if self.model is not None and self.model.created:
                self.model.detach()
            self.run = None
            return
        for seq, env in run.buffer.ready():
            t0 = time.perf_counter()
            self._progressed = False
            self.execute(run, seq, env)
            log.info(
                "seq %d %s done in %.3fs (request %s)%s",
                seq,
                env.kind.value,
                time.perf_counter() - t0,
                env.request_id,
                " (replayed)" if seq < run.replay_until else "",
            )
            if not self._progressed:  # (an answer written by this op carried it)
                self.progress()
            entry = run.entry_ids.pop(seq, None)
            if entry is not None:
                run.log.executed.append((seq, entry))  # in the log until a snapshot covers it
            self._maybe_snapshot()
            if self.stopping:
                break

    def _maybe_snapshot(self) -> None:
        """Start a snapshot of the run when one is due (after ops, and on the loop's ticks: a
        run that went idle, or whose due snapshot waited for a running one, is covered too)."""
        run = self.run
        if run is not None and self.model is not None:
            self.snapshotter.maybe(self.model, run.log, run.buffer.next_seq, _seq0_error(run))

    def execute(self, run: AttachedRun, seq: int, env: OpEnvelope) -> None:
        answered = seq < run.replay_until and self._answered(env.request_id)
        if answered and env.kind in (*SAVE_KINDS, OpKind.REJECTED):
            return  # nothing to redo: saves leave the training state as it is
        self._mute = env.request_id if answered else None
        try:
            self._execute(run, seq, env)
        finally:
            self._mute = None

    def _execute(self, run: AttachedRun, seq: int, env: OpEnvelope) -> None:
        try:
            if seq == 0:
                self._seq0(run, env)
            elif run.seq0_error is not None:
                msg, cat = run.seq0_error
                self._fail(run.run_id, env, f"the model was not created: {msg}", cat)
            else:
                self._op(run, seq, env)
        except redis.RedisError:
            raise  # Redis itself is gone for good: exit (the control plane fails pending futures)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failed future
            msg, cat = _classify(exc)
            if cat == ErrorCategory.SERVER:
                log.error(
                    "seq %d %s failed (request %s): %s\n%s",
                    seq,
                    env.kind.value,
                    env.request_id,
                    msg,
                    traceback.format_exc(),
                )
            else:
                log.info("seq %d %s rejected (request %s): %s", seq, env.kind.value, env.request_id, msg)
            if seq == 0:
                run.seq0_error = (msg, cat)
            self._fail(run.run_id, env, msg, cat)
            _free_accelerator_memory()

    def _fail(self, run_id: str, env: OpEnvelope, msg: str, cat: ErrorCategory) -> None:
        if env.kind in SAVE_KINDS:
            self.complete(Completion(request_id=env.request_id, run_id=run_id, kind=env.kind, error=msg, category=cat))
        else:
            self.write_result(run_id, env.request_id, FutureResult.failed(msg, cat))

    def _ok(self, run: AttachedRun, env: OpEnvelope, result: dict[str, Any]) -> None:
        self.write_result(run.run_id, env.request_id, FutureResult.ok_json(result))

    def _seq0(self, run: AttachedRun, env: OpEnvelope) -> None:
        m = self._model()
        if env.kind == OpKind.CREATE:
            result = m.create(_body(op_bodies.decode_create, env.body))
        elif env.kind == OpKind.LOAD_WEIGHTS:
            result = m.create_from_checkpoint(_body(op_bodies.decode_load, env.body))
            result = _load_result(result, env.dialect)
        else:
            raise UserError(f"seq 0 must be create or load_weights, got {env.kind.value}")
        self._ok(run, env, result)

    def _op(self, run: AttachedRun, seq: int, env: OpEnvelope) -> None:
        m = self._model()
        kind = env.kind
        if kind == OpKind.REJECTED:
            log.info("seq %d was rejected by the control plane: %s", seq, env.body[:200].decode(errors="replace"))
        elif kind == OpKind.FORWARD_BACKWARD:
            step, t0 = self._optim_steps() + 1, time.perf_counter()
            if env.dialect == Dialect.LOOPS:
                result = FutureResult(FutureState.DONE, JSON_CONTENT, m.loops_forward_backward(env.body))
            else:
                result = FutureResult.ok_proto(m.forward_backward(env.body))
            fwd = TelemetryKind.FORWARD if m.last_forward_only else TelemetryKind.FORWARD_BACKWARD
            telemetry = _telemetry(run.run_id, seq, fwd, step, t0, m.last_metrics)
            self.write_result(run.run_id, env.request_id, result, telemetry)
        elif kind == OpKind.OPTIM_STEP:
            step, t0 = self._optim_steps() + 1, time.perf_counter()
            out = m.optim_step(_body(op_bodies.decode_optim, env.body))
            telemetry = _telemetry(run.run_id, seq, TelemetryKind.OPTIM_STEP, step, t0, out.get("metrics") or {})
            self.write_result(run.run_id, env.request_id, FutureResult.ok_json(out), telemetry)
        elif kind == OpKind.INIT_TRAINER:
            self._ok(run, env, m.init_trainer(_body(op_bodies.decode_init, env.body).lora_rank))
        elif kind == OpKind.LOAD_WEIGHTS:
            self._ok(run, env, _load_result(m.load(_body(op_bodies.decode_load, env.body)), env.dialect))
        elif kind in SAVE_KINDS:
            self._save(run, seq, env)
        elif kind == OpKind.CREATE:
            raise UserError("create is only valid as seq 0 (the model already exists)")
        else:
            raise UserError(f"unsupported op kind {kind.value}")

    def _save(self, run: AttachedRun, seq: int, env: OpEnvelope) -> None:
        m = self._model()
        body = _body(op_bodies.decode_save, env.body)
        out = m.save(body, seq)
        version = self._optim_steps()
        result = out.result
        if env.dialect == Dialect.LOOPS:
            assert body.name is not None
            path = CheckpointRef(run.run_id, body.checkpoint_kind, body.name).loops_path
            result = (
                {"mode": "lora", "path": path}
                if body.checkpoint_kind == "weights"
                else {"version": version, "path": path}
            )
        self.complete(
            Completion(
                request_id=env.request_id,
                run_id=run.run_id,
                kind=env.kind,
                result=result,
                checkpoint_kind=body.checkpoint_kind,
                checkpoint_name=body.name,
                storage_prefix=body.storage_prefix,
                files=out.files,
                lora_config=out.lora,
                sampling_session_seq_id=body.sampling_session_seq_id,
                ttl_seconds=body.ttl_seconds,
                user_metadata=body.user_metadata,
                policy_version=version,
                publish=body.publish,
            )
        )


def _telemetry(
    run_id: str, seq: int, kind: TelemetryKind, step: int, t0: float, metrics: dict[str, float]
) -> OpTelemetry:
    """The telemetry entry of an op that started at ``t0`` (``perf_counter``) and just ended;
    non-finite metrics become null (JSON, and Postgres's JSONB, have no NaN)."""
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    tokens = clean.get("num_tokens:sum", clean.get("num_tokens")) or 0.0
    return OpTelemetry(
        run_id=run_id,
        seq=seq,
        kind=kind,
        step=step,
        time=time.time(),
        duration_s=time.perf_counter() - t0,
        tokens=int(tokens) if kind != TelemetryKind.OPTIM_STEP else 0,
        metrics=clean,
    )


def _seq0_error(run: AttachedRun) -> tuple[str, str] | None:
    return (run.seq0_error[0], run.seq0_error[1].value) if run.seq0_error else None


def _id(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def _attach_event(fields: dict[bytes, bytes]) -> AttachEvent | None:
    try:
        return AttachEvent.from_fields(fields)
    except (KeyError, ValueError) as exc:
        log.error("ignoring a malformed attach event: %s", exc)
        return None


def _load_result(result: dict[str, Any], dialect: Dialect) -> dict[str, Any]:
    """A load's answer: ``{"step": n}`` for Loops clients, the Tinker shape otherwise."""
    if dialect == Dialect.LOOPS:
        return {"step": int(result.get("step", 0))}
    return {k: v for k, v in result.items() if k != "step"}


def _body(decode: Callable[[bytes], T], raw: bytes) -> T:
    try:
        return decode(raw)
    except (TypeError, KeyError, ValueError) as exc:
        raise UserError(f"malformed op body: {type(exc).__name__}: {exc}") from None


def _gpu_usage() -> dict[str, dict[str, float]] | None:
    """Memory and utilisation of each visible GPU (None without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        out: dict[str, dict[str, float]] = {}
        for i in range(torch.cuda.device_count()):
            entry = {"memory_bytes": float(torch.cuda.memory_reserved(i))}
            try:
                entry["utilization"] = float(torch.cuda.utilization(i)) / 100.0
            except Exception:  # noqa: BLE001 - needs NVML; memory alone is still useful
                pass
            out[str(i)] = entry
        return out
    except Exception:  # noqa: BLE001
        return None


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
