"""When a trainer worker snapshots its run, and the op log that snapshots make disposable.

A run's op stream is its durable op log: the worker deletes an executed op's entry only once
a snapshot that covers it (``snapshot.next_seq > seq``) is current in the object store. So at
any moment, the current snapshot plus the ops still in the stream are the whole run, and a
new worker that restores the one and replays the other continues exactly.

Policy: a snapshot is due after the first op of a run (seq 0: it pins the initial adapter),
then once ``max_ops`` ops ran since the last one, or ``interval_s`` seconds passed with at
least one op since it. The worker asks after every op and on every tick of its loop (about a
second), so an idle run's last ops are covered within ``interval_s`` too. The copy of the state happens between two ops in the worker's thread
(:func:`data_plane.trainer.snapshots.capture`, CPU copies of the LoRA tensors); serialising
and uploading happen in a background thread, one snapshot at a time, so training goes on
meanwhile. On stop the worker waits for it and writes a final one (:meth:`Snapshotter.final`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from data_plane.storage.base import ObjectStore
from data_plane.trainer import snapshots

if TYPE_CHECKING:
    from data_plane.trainer.training import TrainingModel

log = logging.getLogger("openloops.trainer.snapshots")


@dataclass(slots=True)
class RunLog:
    """One run's executed-but-not-yet-snapshotted ops and its snapshot bookkeeping."""

    run_id: str
    prefix: str  # the run's snapshot prefix in the object store
    executed: list[tuple[int, str]] = field(default_factory=list)  # (seq, stream entry id)
    snapshot_seq: int | None = None  # next_seq of the current snapshot (None: none yet)
    last_snapshot_at: float = field(default_factory=time.monotonic)

    @property
    def ops_since(self) -> int:
        return len(self.executed)


@dataclass(frozen=True, slots=True)
class SnapshotDone:
    """What a finished snapshot reports (to trim the op log and record progress)."""

    run_id: str
    next_seq: int
    optim_steps: int
    entries: list[str]  # op-log entries it made disposable
    seconds: float
    size_bytes: int


class Snapshotter:
    def __init__(
        self,
        store_of: Callable[[], ObjectStore],
        *,
        interval_s: float,
        max_ops: int,
        on_done: Callable[[SnapshotDone], None],
        owns: Callable[[str], bool] = lambda _run_id: True,
    ) -> None:
        self._store_of = store_of
        self.interval_s = max(0.0, interval_s)
        self.max_ops = max(1, max_ops)
        self._on_done = on_done
        self._owns = owns  # whether this worker still owns a run (fencing against a successor)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._returned: dict[str, list[tuple[int, str]]] = {}  # entries of failed uploads, per run
        self.failures = 0
        self.written = 0

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def due(self, run: RunLog, now: float | None = None) -> bool:
        self._take_back(run)
        if run.ops_since == 0:
            return False
        if run.snapshot_seq is None or run.ops_since >= self.max_ops:
            return True
        return (time.monotonic() if now is None else now) - run.last_snapshot_at >= self.interval_s

    def maybe(self, model: TrainingModel, run: RunLog, next_seq: int, seq0_error: tuple[str, str] | None) -> bool:
        """Start a snapshot in the background when one is due and none is running."""
        if self.busy or not self.due(run):
            return False
        self._start(model, run, next_seq, seq0_error, background=True)
        return True

    def final(self, model: TrainingModel, run: RunLog, next_seq: int, seq0_error: tuple[str, str] | None) -> bool:
        """Wait for a running snapshot, then write one covering everything executed (in this
        thread). True when the run's state is fully in the store afterwards."""
        self.wait()
        self._take_back(run)
        if run.ops_since == 0:
            return True
        return self._start(model, run, next_seq, seq0_error, background=False)

    def wait(self, timeout_s: float | None = None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout_s)

    def _take_back(self, run: RunLog) -> None:
        """Entries of a failed upload count as not snapshotted again."""
        with self._lock:
            back = self._returned.pop(run.run_id, None)
        if back:
            run.executed = sorted(back + run.executed)

    def _start(
        self,
        model: TrainingModel,
        run: RunLog,
        next_seq: int,
        seq0_error: tuple[str, str] | None,
        *,
        background: bool,
    ) -> bool:
        t0 = time.perf_counter()
        snap = snapshots.capture(model, run.run_id, next_seq, seq0_error)
        covered = [(s, e) for s, e in run.executed if s < next_seq]
        run.executed = [(s, e) for s, e in run.executed if s >= next_seq]
        run.last_snapshot_at = time.monotonic()
        log.debug("captured run %s at seq %d in %.3fs", run.run_id, next_seq, time.perf_counter() - t0)
        if not background:
            return self._write(snap, run, covered, t0)
        self._thread = threading.Thread(
            target=self._write, args=(snap, run, covered, t0), name=f"snapshot-{run.run_id}", daemon=True
        )
        self._thread.start()
        return True

    def _write(self, snap: snapshots.RunSnapshot, run: RunLog, covered: list[tuple[int, str]], t0: float) -> bool:
        try:
            manifest = snapshots.write(self._store_of(), run.prefix, snap, lambda: self._owns(run.run_id))
        except snapshots.Superseded as exc:
            log.warning("%s", exc)  # the successor has everything: its log is intact
            return False
        except Exception as exc:  # noqa: BLE001 - the op log still holds everything: retry later
            self.failures += 1
            log.warning("snapshot of run %s at seq %d failed (kept its ops): %s", run.run_id, snap.next_seq, exc)
            with self._lock:
                self._returned.setdefault(run.run_id, []).extend(covered)
            return False
        run.snapshot_seq = snap.next_seq
        self.written += 1
        done = SnapshotDone(
            run_id=run.run_id,
            next_seq=snap.next_seq,
            optim_steps=snap.optim_steps,
            entries=[e for _, e in covered],
            seconds=time.perf_counter() - t0,
            size_bytes=manifest.size_bytes,
        )
        log.info(
            "snapshot of run %s at seq %d (step %d): %d bytes in %.3fs",
            run.run_id,
            snap.next_seq,
            snap.optim_steps,
            manifest.size_bytes,
            done.seconds,
        )
        if not self._owns(run.run_id):
            log.warning("run %s moved to another worker: leaving its op log alone", run.run_id)
            return True
        try:
            self._on_done(done)
        except Exception as exc:  # noqa: BLE001 - trimming is best effort: a later replay skips them
            log.warning("after the snapshot of run %s: %s", run.run_id, exc)
        return True
