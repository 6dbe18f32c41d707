"""Durable runs: ``python -m bench.durable [--quick] [--readme]``.

What durable runs cost and what a restart takes, with the unmodified tinker SDK against
``openloops serve`` (API + controller; the controller starts the trainer worker subprocess) on
embedded PostgreSQL + Valkey, with the ``bench`` model and bench.trainer_sdk's step (32 x 256
tokens per ``forward_backward``, LoRA rank 32, then ``optim_step``, both awaited):

1. **Snapshot overhead per step.** The snapshot policy is a server setting, so two stacks run
   side by side, each with its own server, trainer worker and run: *every step*
   (``OPENLOOPS_TRAINER_SNAPSHOT_MAX_OPS=2``, no interval) and *off* (only the snapshot after seq 0; the
   op count and interval out of reach). Steps run on one side at a time, in blocks alternating
   between the sides (which side goes first alternates by round), so drift in the machine's
   speed hits both alike. A block's first step is not measured (no snapshot of the step before
   it runs under it), and a block ends once its last snapshot is in the store, so none spills
   into the other side's block. The added time per step, and what the default policy (every 64
   ops or 60 s) costs by amortising it; the snapshots' size and own duration (capture, then
   serialise and upload in the background) from the worker's log, the figures it also writes to
   the run-state hash.
2. **Trainer peak memory** (VmHWM, reset at the start of every block) on both sides.
3. **Kill to result**: SIGKILL of the *every step* side's trainer while a ``forward_backward``
   is in flight; the time until that op's result reaches the client, broken down from the
   deployment's status history, the new process's start time and the new worker's log.
4. **Wake from zero**: the run's deployment gets ``scale_down_delay_seconds=2`` (in the
   database); once the run is SCALED_TO_ZERO and its trainer gone, the time from submitting a
   ``forward_backward`` to its result, broken down the same way.

Prints the machine and its load average first, and the results as markdown at the end;
``--readme`` also writes them into bench/README.md (between the markers of ``durable``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import re
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.batch import LR, RANK, batch_tokens
from bench.live import (
    make_key,
    pct,
    start_openloops,
    started_at,
    trainer_pid,
)
from bench.machine import load_average, machine_line
from bench.proc_memory import peak_rss_mib, reset_peak_rss
from bench.readme_section import publish
from bench.stack import Stack, start_stack
from bench.trainer_sdk import bench_model, sdk_batch
from control_plane.scheduler.protocol import LogLine, LogQuery, WorkloadRole
from control_plane.settings import Settings

EVERY_STEP, OFF = "every step", "off"
NEVER = {"OPENLOOPS_TRAINER_SNAPSHOT_MAX_OPS": str(10**9), "OPENLOOPS_TRAINER_SNAPSHOT_INTERVAL_SECONDS": "1e9"}
POLICIES = {
    # after every second op (forward_backward + optim_step): one snapshot per step, after the
    # optim_step; no interval, which would fire after the first op once a side has been idle
    # through the other side's block and put the snapshots after the forward_backwards
    EVERY_STEP: {**NEVER, "OPENLOOPS_TRAINER_SNAPSHOT_MAX_OPS": "2"},
    OFF: NEVER,
}
DEFAULT_MAX_OPS = int(Settings.model_fields["trainer_snapshot_max_ops"].default)
DEFAULT_INTERVAL_S = float(Settings.model_fields["trainer_snapshot_interval_seconds"].default)
CONTROLLER_INTERVAL_S = float(Settings.model_fields["controller_interval_seconds"].default)
TARGET_PCT = 3.0  # at most this much added per step at the default policy
SNAPSHOT_LINE = re.compile(r"snapshot of run \S+ at seq \d+ \(step \d+\): (\d+) bytes in ([\d.]+)s")
FORWARD_BACKWARD_LINE = re.compile(r"seq \d+ forward_backward done in ([\d.]+)s \(request \S+\)$")


class Side:
    """A stack with its own ``openloops serve`` (one snapshot policy), a Tinker run on it, and
    the database, Redis and trainer log behind them."""

    def __init__(self, policy: str, stack: Stack, catalog: Path, model_name: str) -> None:
        import tinker

        from control_plane.db.engine import Database
        from control_plane.db.models import Run

        self.policy, self.stack = policy, stack
        # info: the trainer (which inherits the server's environment) logs every op and snapshot;
        # the controller at its default interval (it notices a dead trainer)
        self.server = start_openloops(
            stack,
            catalog,
            policy.replace(" ", "-"),
            OPENLOOPS_LOG_LEVEL="info",
            OPENLOOPS_CONTROLLER_INTERVAL_SECONDS=str(CONTROLLER_INTERVAL_S),
            **POLICIES[policy],
        )
        self.loop = asyncio.new_event_loop()
        self.db = Database(stack.database_url)
        self.r = redis.Redis.from_url(stack.redis_url.replace("valkey://", "redis://", 1))
        try:
            key = asyncio.run(make_key(stack.database_url, "bench-durable"))
            t0 = time.perf_counter()
            service = tinker.ServiceClient(base_url=self.server.base, api_key=key)
            self.tc = service.create_lora_training_client(model_name, rank=RANK, seed=0).result()
            self.run_id = str(self.tc.model_id)
            self.deployment_id = str(self.sql(lambda s: s.get(Run, self.run_id)).deployment_id)
        except BaseException:
            self.close()
            raise
        print(f"[{policy}] run {self.run_id} ready in {time.perf_counter() - t0:.1f} s", flush=True)

    def close(self) -> None:
        self.server.stop()
        self.loop.run_until_complete(self.db.close())
        self.loop.close()
        self.r.close()

    def sql(self, fn: Callable[[Any], Any]) -> Any:
        async def go() -> Any:
            async with self.db.transaction() as s:
                return await fn(s)

        return self.loop.run_until_complete(go())

    def status(self) -> str:
        from control_plane.db.models import Run

        return str(self.sql(lambda s: s.get(Run, self.run_id)).status)

    def wait(self, what: str, done: Callable[[], bool], timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"[{self.policy}] {what} (run {self.status()}); see {self.server.log}")
            time.sleep(0.1)

    def pid(self) -> int:
        pid = trainer_pid(self.stack.redis_url, self.deployment_id)
        assert pid is not None, "no trainer worker"
        return pid

    def step(self, data: list[Any]) -> tuple[float, float]:
        """One training step, both results awaited: (seconds, loss:sum)."""
        from tinker import types

        t = time.perf_counter()
        fb = self.tc.forward_backward(data, "cross_entropy")
        opt = self.tc.optim_step(types.AdamParams(learning_rate=LR))
        loss = float(fb.result().metrics["loss:sum"])
        opt.result()
        return time.perf_counter() - t, loss

    def run_state(self) -> dict[str, str]:
        from data_plane.wire.queue import run_state_key, text

        return {text(k): text(v) for k, v in self.r.hgetall(run_state_key(self.run_id)).items()}

    def settle(self) -> None:
        """Until no snapshot is being written: the current one covers every executed op, or
        every one but the last optim_step (when a snapshot was due while the one before was
        still being written, it is taken after the next op: after a forward_backward from then
        on, and none is due until the next op)."""
        if self.policy != EVERY_STEP:
            return
        deadline = time.monotonic() + 10
        while (st := self.run_state()).get("snapshot_seq") != st.get("next_seq"):
            if time.monotonic() > deadline:
                assert int(st["snapshot_seq"]) == int(st["next_seq"]) - 1, st
                print(f"  [{self.policy}] the snapshots come after the forward_backwards now", flush=True)
                return
            time.sleep(0.1)

    def history_id(self) -> int:
        from sqlalchemy import func, select

        from control_plane.db.models import StatusHistory

        return int(self.sql(lambda s: s.scalar(select(func.coalesce(func.max(StatusHistory.id), 0)))))

    def woke_at(self, after_id: int) -> float:
        """When the deployment became WAKING_UP (its first such history row after ``after_id``)."""
        from sqlalchemy import select

        from control_plane.db.models import StatusHistory

        stmt = (
            select(StatusHistory.created_at)
            .where(
                StatusHistory.id > after_id,
                StatusHistory.resource_type == "deployment",
                StatusHistory.resource_id == self.deployment_id,
                StatusHistory.to_status == "WAKING_UP",
            )
            .order_by(StatusHistory.id)
            .limit(1)
        )
        return float(self.sql(lambda s: s.scalar(stmt)).timestamp())

    def trainer_log(self, start_s: float, end_s: float) -> list[LogLine]:
        from control_plane.scheduler.local import LocalProcessBackend

        backend = LocalProcessBackend(self.stack.data_dir / "workers")
        query = LogQuery(int(start_s * 1e9), int(end_s * 1e9), 1000, "asc", "INFO")
        try:
            return self.loop.run_until_complete(backend.logs(self.deployment_id, WorkloadRole.TRAINER, query))
        finally:
            self.loop.run_until_complete(backend.close())


# --- 1 + 2: steps with and without snapshots -----------------------------------------------


@dataclass
class Block:
    policy: str
    times: list[float]
    peak_rss_mib: float | None
    losses: list[float]  # every step's, the one that is not measured included


def block(side: Side, data: list[Any], steps: int) -> Block:
    """``steps`` measured steps after one that is not; the worker's peak RSS over the block."""
    pid = side.pid()
    reset_peak_rss(pid)
    times, losses = [], []
    for i in range(steps + 1):
        dt, loss = side.step(data)
        print(f"  [{side.policy}] step {dt:.3f} s loss:sum={loss:.1f}{' (lead-in)' if i == 0 else ''}", flush=True)
        losses.append(loss)
        if i > 0:
            times.append(dt)
    side.settle()
    return Block(side.policy, times, peak_rss_mib(pid), losses)


@dataclass
class WorkerStats:
    """From the worker's log: its snapshots' sizes and own durations, its forward_backwards'
    durations."""

    snapshot_bytes: list[int]
    snapshot_s: list[float]
    forward_backward_s: list[float]


def worker_stats(side: Side, start_s: float, end_s: float) -> WorkerStats:
    out = WorkerStats([], [], [])
    for line in side.trainer_log(start_s, end_s):
        if m := SNAPSHOT_LINE.search(line.message):
            out.snapshot_bytes.append(int(m.group(1)))
            out.snapshot_s.append(float(m.group(2)))
        elif m := FORWARD_BACKWARD_LINE.search(line.message):
            out.forward_backward_s.append(float(m.group(1)))
    return out


# --- 3 + 4: kill to result, wake from zero ------------------------------------------------


@dataclass
class Recovery:
    total_s: float
    parts: dict[str, float]  # in order; they add up to total_s


def recovery(side: Side, t0: float, t_result: float, spawned: float, history_id: int, first: str) -> Recovery:
    """Where the time from ``t0`` (the kill, or the op's submission) to the op's result went:
    the deployment's WAKING_UP row, the new trainer's process start (``spawned``), its log (base
    model loaded, run restored, replayed ops, the op itself), the client."""
    woke = side.woke_at(history_id)
    lines = [(x.timestamp_ns / 1e9, x.message) for x in side.trainer_log(t0, t_result + 1)]

    def first_line(text: str, after: float) -> float:
        return next(t for t, m in lines if t >= after and text in m)

    loaded = first_line("base model", spawned)
    restored = first_line("resumed run", loaded)
    replayed = [t for t, m in lines if t >= restored and "(replayed)" in m]
    replay_end = max(replayed, default=restored)
    op_done = next(t for t, m in lines if t >= replay_end and "forward_backward done" in m and "(replayed)" not in m)
    return Recovery(
        t_result - t0,
        {
            first: woke - t0,
            "new trainer process started": spawned - woke,
            "Python start + base model loaded": loaded - spawned,
            "run restored from its snapshot": restored - loaded,
            f"ops replayed ({len(replayed) or 'none'} here)": replay_end - restored,
            "the `forward_backward` itself": op_done - replay_end,
            "result reaches the client": t_result - op_done,
        },
    )


def kill_during_forward_backward(side: Side, data: list[Any]) -> Recovery:
    from tinker import types

    from data_plane.wire.queue import run_pending_key

    side.wait("ACTIVE", lambda: side.status() == "ACTIVE")
    side.settle()
    pid, hid = side.pid(), side.history_id()
    fb = side.tc.forward_backward(data, "cross_entropy")
    side.wait("op in flight", lambda: bool(side.r.scard(run_pending_key(side.run_id))), 60)
    time.sleep(0.5)  # the worker is into it (a forward_backward takes seconds here)
    os.kill(pid, signal.SIGKILL)
    t_kill = time.time()
    opt = side.tc.optim_step(types.AdamParams(learning_rate=LR))
    fb.result()
    t_result = time.time()
    spawned = started_at(side.pid())
    opt.result()
    return recovery(side, t_kill, t_result, spawned, hid, "controller notices the death")


def wake_from_zero(side: Side, data: list[Any]) -> Recovery:
    from tinker import types

    pid = side.pid()
    side.wait("SCALED_TO_ZERO", lambda: side.status() == "SCALED_TO_ZERO")
    side.wait("trainer exit", lambda: not psutil.pid_exists(pid), 60)
    hid = side.history_id()
    t0 = time.time()
    fb = side.tc.forward_backward(data, "cross_entropy")
    opt = side.tc.optim_step(types.AdamParams(learning_rate=LR))
    fb.result()
    t_result = time.time()
    spawned = started_at(side.pid())  # before it scales to zero again
    opt.result()
    return recovery(side, t0, t_result, spawned, hid, "the op wakes the deployment")


def set_scale_down_delay(side: Side, seconds: int) -> None:
    from sqlalchemy import update

    from control_plane.db.models import Deployment

    stmt = update(Deployment).where(Deployment.id == side.deployment_id).values(scale_down_delay_seconds=seconds)
    side.sql(lambda s: s.execute(stmt))


# --- report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DurableReport:
    date: str
    quick: bool
    machine: str  # bench.machine's line at the start
    end_load: float
    rounds: int
    block: int  # measured steps per block
    blocks: list[Block]  # in the order they ran, one per policy and round
    stats: WorkerStats  # the every-step side's worker over the blocks
    run_state_snapshot_bytes: str | None  # the every-step run's run-state hash after the blocks
    kills: list[Recovery]
    wakes: list[Recovery]


def median_parts(runs: list[Recovery]) -> list[float]:
    """Each part's median over ``runs``, in the parts' order."""
    return [statistics.median(list(r.parts.values())[i] for r in runs) for i in range(len(runs[0].parts))]


def recovery_rows(title: str, runs: list[Recovery]) -> list[str]:
    totals = [r.total_s for r in runs]
    rows = [
        f"| {title}, median of {len(runs)} (range) | {statistics.median(totals):.1f} s "
        f"({min(totals):.1f}–{max(totals):.1f}) |"
    ]
    for name, med in zip(runs[0].parts, median_parts(runs)):
        rows.append(f"| &nbsp;&nbsp;{name} | {med:.2f} s |")
    return rows


@dataclass(frozen=True)
class SnapshotCost:
    """What the blocks say a snapshot costs a step."""

    on_s: float  # median step, a snapshot every step
    off_s: float  # median step, snapshots off
    per_round: list[float]  # each round's every-step median over its off median, minus 1
    steps_on: int  # steps the every-step side took in the blocks
    default_steps: float  # steps between two snapshots at the default policy, at this step time
    default_pct: float  # the measured added time, amortised over default_steps
    bound_pct: float  # the snapshot's whole own duration, amortised over default_steps
    rss_on: float  # MiB, the largest block's peak
    rss_off: float

    @property
    def added(self) -> float:
        return self.on_s / self.off_s - 1

    @property
    def interval_first(self) -> bool:
        """At the default policy the interval, not the op count, takes each snapshot."""
        return DEFAULT_INTERVAL_S / self.off_s < DEFAULT_MAX_OPS / 2


def snapshot_cost(report: DurableReport) -> SnapshotCost:
    blocks = report.blocks
    on_blocks, off_blocks = [b for b in blocks if b.policy == EVERY_STEP], [b for b in blocks if b.policy == OFF]
    on = statistics.median(t for b in on_blocks for t in b.times)
    off = statistics.median(t for b in off_blocks for t in b.times)
    steps_on = report.rounds * (report.block + 1)
    # the added seconds per snapshot, and the default policy: a snapshot every DEFAULT_MAX_OPS
    # ops (2 per step) or DEFAULT_INTERVAL_S seconds, whichever comes first
    per_snapshot = (on - off) * steps_on / max(1, len(report.stats.snapshot_bytes))
    default_steps = min(DEFAULT_MAX_OPS / 2, DEFAULT_INTERVAL_S / off)
    return SnapshotCost(
        on_s=on,
        off_s=off,
        # each round has one block of each policy
        per_round=[
            statistics.median(b_on.times) / statistics.median(b_off.times) - 1
            for b_on, b_off in zip(on_blocks, off_blocks)
        ],
        steps_on=steps_on,
        default_steps=default_steps,
        default_pct=100 * per_snapshot / default_steps / off,
        bound_pct=100 * statistics.median(report.stats.snapshot_s) / default_steps / off,
        rss_on=max((b.peak_rss_mib or 0.0) for b in on_blocks),
        rss_off=max((b.peak_rss_mib or 0.0) for b in off_blocks),
    )


def render(report: DurableReport) -> str:
    """The README section's body: when, where, the table, the target and what a kill costs."""
    cost = snapshot_cost(report)
    losses = {p: [x for b in report.blocks if b.policy == p for x in b.losses] for p in (EVERY_STEP, OFF)}
    return "\n".join(
        [
            f"### Latest results ({report.date}{', --quick' if report.quick else ''})",
            "",
            f"{report.machine} at start, {report.end_load:.2f} at the end. {report.rounds} rounds of {report.block} "
            f"measured steps per policy, {len(report.kills)} kills, {len(report.wakes)} wakes. "
            + losses_sentence(losses[EVERY_STEP], losses[OFF]),
            "",
            "| measurement | result |",
            "|---|---|",
            *table_rows(report, cost),
            "",
            target_paragraph(report, cost),
            "",
            kill_paragraph(report.kills, report.wakes),
        ]
    )


def table_rows(report: DurableReport, cost: SnapshotCost) -> list[str]:
    times = {p: [t for b in report.blocks if b.policy == p for t in b.times] for p in (EVERY_STEP, OFF)}
    sizes, snap_s, per_round = report.stats.snapshot_bytes, report.stats.snapshot_s, cost.per_round
    return [
        *(
            f"| step, {label}: median / p90 | {statistics.median(times[p]):.3f} / {pct(times[p], 0.9):.3f} s |"
            for p, label in ((OFF, "snapshots off (only after seq 0)"), (EVERY_STEP, "a snapshot every step"))
        ),
        f"| added per step, a snapshot every step | {100 * cost.added:+.1f}% ({cost.on_s - cost.off_s:+.3f} s); "
        f"per round {100 * statistics.median(per_round):+.1f}% ({100 * min(per_round):+.1f} to "
        f"{100 * max(per_round):+.1f}) |",
        f"| snapshot: size / own duration median (p90), {len(sizes)} over {cost.steps_on} steps | "
        f"{statistics.median(sizes) / 2**20:.2f} MiB / {statistics.median(snap_s):.3f} s ({pct(snap_s, 0.9):.3f} s) |",
        f"| default policy (every {DEFAULT_MAX_OPS} ops or {DEFAULT_INTERVAL_S:.0f} s: every "
        f"{cost.default_steps:.1f} steps here), amortised | {cost.default_pct:+.2f}% (all of the snapshot's own "
        f"duration on the step: {cost.bound_pct:+.2f}%) |",
        f"| trainer peak RSS (VmHWM per block), snapshots off / every step | {cost.rss_off:,.0f} / "
        f"{cost.rss_on:,.0f} MiB ({cost.rss_on - cost.rss_off:+,.0f}) |",
        "| for comparison: a `forward_backward` in the blocks (worker log), median | "
        f"{statistics.median(report.stats.forward_backward_s):.2f} s |",
        *recovery_rows("SIGKILL during `forward_backward` → its result in the client", report.kills),
        *recovery_rows("scaled to zero: `forward_backward` submitted → its result", report.wakes),
    ]


def target_paragraph(report: DurableReport, cost: SnapshotCost) -> str:
    """The target against the default policy's cost, the bound on it, the snapshot's memory."""
    lo, hi = min(cost.per_round), max(cost.per_round)
    spread = f"{100 * lo:+.0f}% to {100 * hi:+.0f}%"
    if abs(cost.added) < max(abs(lo), abs(hi)):
        every_step = (
            "Even a snapshot every step costs less than this machine's noise: the medians differ by "
            f"{100 * cost.added:+.1f}% and single rounds by {spread}, so the bench cannot resolve it below a few percent"
        )
    else:
        every_step = (
            f"A snapshot every step moves the median step by {100 * cost.added:+.1f}% ({spread} in single rounds)"
        )
    fires_first = f"the {DEFAULT_INTERVAL_S:.0f} s interval" if cost.interval_first else f"{DEFAULT_MAX_OPS} ops"
    snap_s, size_mib = (
        statistics.median(report.stats.snapshot_s),
        statistics.median(report.stats.snapshot_bytes) / 2**20,
    )
    added_mib = cost.rss_on - cost.rss_off
    return (
        f"Target: ≤ {TARGET_PCT:.0f}% added per step at the default policy, "
        f"{'met' if cost.default_pct <= TARGET_PCT else 'not met'}. {every_step}; the snapshot's own duration bounds "
        f"it ({snap_s:.3f} s of a {cost.off_s:.2f} s step: at most {100 * snap_s / cost.off_s:+.1f}% every step, "
        f"{cost.bound_pct:+.2f}% at the default policy, where {fires_first} fires first at this step time). "
        f"{run_state_sentence(report.run_state_snapshot_bytes, report.stats.snapshot_bytes)} The snapshot adds "
        f"{added_mib:,.0f} MiB ({cost.rss_on / cost.rss_off - 1:.0%}) to the trainer's {cost.rss_off / 1024:.1f} GiB "
        f"peak, about {added_mib / size_mib:.1f}× its size (capture clones the tensors, `safetensors` serialises "
        "them into one more copy before the upload)."
    )


def losses_sentence(every_step: list[float], off: list[float]) -> str:
    if every_step == off:
        return "Both runs' losses were identical step for step."
    worst = max(abs(a - b) / abs(a) for a, b in zip(every_step, off))
    return f"The runs' losses differ: by up to {worst:.1e} relative."


def run_state_sentence(snapshot_bytes: str | None, logged: list[int]) -> str:
    """Whether the run-state hash names the snapshot the worker logged last."""
    if logged and snapshot_bytes == str(logged[-1]):
        return f"The run-state hash agreed with the worker's log (last snapshot {logged[-1]:,} bytes)."
    return (
        f"The run-state hash ({snapshot_bytes} bytes) did not agree with the worker's log "
        f"(last snapshot {f'{logged[-1]:,}' if logged else 'none'} bytes)."
    )


def kill_paragraph(kills: list[Recovery], wakes: list[Recovery]) -> str:
    """What a kill costs the op in flight, part by part, and what waking from zero takes."""
    notice, spawn, load, restore, replay, op, _client = median_parts(kills)
    extra = notice + spawn + load + restore + replay
    replay_part = f", the replay of the ops since the snapshot ({replay:.2f} s)" if replay else ""
    replay_note = (
        "Nothing was replayed here because the snapshot covered every op before the killed one; at the default "
        "policy a kill also replays"
        if not replay
        else "A kill replays"
    )
    wake_op = median_parts(wakes)[5]
    return (
        f"A kill costs the op in flight ~{extra:.1f} s more than it would have taken: the controller's pass "
        f"({CONTROLLER_INTERVAL_S:g} s interval: {notice:.2f} s here), a fresh Python process with torch and the base "
        f"model ({spawn + load:.1f} s), the restore ({restore:.2f} s){replay_part}, then the op again from its start "
        f"({op:.1f} s). {replay_note} the ops since the last snapshot, each about as long as it took the first time — "
        f"up to the {DEFAULT_INTERVAL_S:.0f} s interval's worth of training (or {DEFAULT_MAX_OPS} ops, for steps "
        f"under ~{DEFAULT_INTERVAL_S / (DEFAULT_MAX_OPS / 2):.1f} s). Waking from zero is the same path without the "
        f"detection: {statistics.median(r.total_s for r in wakes):.1f} s, of which the op itself {wake_op:.1f} s."
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.durable", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 1-step blocks, 1 kill, 1 wake")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of one block per policy")
    ap.add_argument("--block", type=int, default=4, help="measured steps per block")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--wakes", type=int, default=3)
    ap.add_argument("--readme", action="store_true", help="write the results into bench/README.md (its section)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.rounds, args.block, args.kills, args.wakes = 1, 1, 1, 1
    os.environ["TINKER_TELEMETRY"] = "0"

    machine = machine_line()
    print(f"machine: {machine}", flush=True)
    stacks: list[Stack] = []
    sides: dict[str, Side] = {}
    try:
        stacks.append(start_stack())
        stacks.append(start_stack(embedded=True))  # the second policy's own database and Valkey
        print("preparing the bench model ...", flush=True)
        model, vocab = bench_model(stacks[0], "bench")
        data = sdk_batch(batch_tokens(vocab))
        for policy, stack in zip((EVERY_STEP, OFF), stacks):
            sides[policy] = Side(policy, stack, stacks[0].data_dir / "catalog.yaml", model.name)

        # 1 + 2: alternating blocks
        blocks: list[Block] = []
        phase_start = time.time()
        for rnd in range(args.rounds):
            order = (EVERY_STEP, OFF) if rnd % 2 == 0 else (OFF, EVERY_STEP)
            for policy in order:
                blocks.append(block(sides[policy], data, args.block))
        stats = worker_stats(sides[EVERY_STEP], phase_start, time.time())
        snapshot_state = sides[EVERY_STEP].run_state()
        sides.pop(OFF).close()

        # 3: SIGKILL during forward_backward
        a = sides[EVERY_STEP]
        kills = []
        for i in range(args.kills):
            kills.append(kill_during_forward_backward(a, data))
            print(f"  kill {i}: result {kills[-1].total_s:.1f} s after the kill: {kills[-1].parts}", flush=True)
            a.step(data)  # an undisturbed step between kills

        # 4: scale to zero and wake
        set_scale_down_delay(a, 2)
        wakes = []
        for i in range(args.wakes):
            wakes.append(wake_from_zero(a, data))
            print(f"  wake {i}: result {wakes[-1].total_s:.1f} s after submitting: {wakes[-1].parts}", flush=True)
    finally:
        for side in sides.values():
            side.close()
        for stack in reversed(stacks):
            stack.stop()
    report = DurableReport(
        date=datetime.date.today().isoformat(),
        quick=args.quick,
        machine=machine,
        end_load=load_average(),
        rounds=args.rounds,
        block=args.block,
        blocks=blocks,
        stats=stats,
        run_state_snapshot_bytes=snapshot_state.get("snapshot_bytes"),
        kills=kills,
        wakes=wakes,
    )
    print(
        f"\nrun-state hash of the every-step run after the blocks: snapshot_seq {snapshot_state.get('snapshot_seq')}, "
        f"snapshot_bytes {snapshot_state.get('snapshot_bytes')}, snapshot_seconds {snapshot_state.get('snapshot_seconds')}"
    )
    print(f"model bench, LoRA rank {RANK}, 32 x 256 tokens per forward_backward\n")
    publish("durable", render(report), readme=args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
