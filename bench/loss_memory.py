"""Trainer memory and step time, full logits vs chunked log-probabilities:
``python -m bench.loss_memory [--quick] [--readme]``.

The trainer's own step (``TrainingModel.forward_backward`` on the protobuf request a worker
receives, then ``optim_step``) on the ``bench`` local model, 32 sequences x 256 tokens,
cross-entropy, LoRA rank 32 on attention, MLP and lm_head, in a fresh process per mode so that
each has its own peak resident set: ``full logits`` computes the loss from the whole
``[tokens, vocab]`` float32 logits (what a trainer does by default while they fit in
``OPENLOOPS_TRAINER_LOGITS_FULL_MAX_MIB``, 1 GiB), ``chunked`` through the output projection 64
MiB of logits at a time (``OPENLOOPS_TRAINER_LOGITS_CHUNK_MIB``; the default beyond 1 GiB, and
here with ``OPENLOOPS_TRAINER_LOGITS_FULL_MAX_MIB=0``), ``chunked + checkpointing`` also
recomputes the decoder layers' activations in the backward pass
(``OPENLOOPS_TRAINER_ACTIVATION_CHECKPOINTING=on``; ``auto``, the default, does so only for
sequences of 4096+ tokens). Each runs on an allocator: ``glibc`` (the C library's; what
trainers used before jemalloc), ``jemalloc`` (preloaded as the control plane does for every
trainer, ``OPENLOOPS_TRAINER_ALLOCATOR=jemalloc``, the default: control_plane/controller/allocator.py)
or ``malloc thresholds`` (glibc with fixed ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``).
Reports the process's peak RSS (VmHWM)
over its whole life (base model load included, what a worker's peak is) and over the measured
steps only (reset after a warm-up step), the median step time, and the losses (they must agree).
Prints the machine first and the results as markdown at the end; ``--readme`` also writes them
into bench/README.md (between the markers of ``loss_memory``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.batch import BATCH, LR, RANK, SEQ, batch_tokens, sft_request
from bench.machine import load_average, machine_line
from bench.proc_memory import peak_rss_mib, reset_peak_rss
from bench.readme_section import publish

if TYPE_CHECKING:
    from data_plane.trainer.training import TrainingModel
from control_plane.controller.allocator import trainer_allocator_env
from control_plane.settings import BackendKind

# name -> (logits chunk MiB, activation checkpointing, allocator); "full logits" is what a
# trainer does by default at this batch (its 256 MiB of logits are below the 1 GiB
# OPENLOOPS_TRAINER_LOGITS_FULL_MAX_MIB; auto checkpointing is for long sequences), on jemalloc
# since trainers preload it; "full logits, glibc" is the baseline of the memory target
MODES: dict[str, tuple[int, str, str]] = {
    "full logits, glibc": (0, "off", "glibc"),
    "full logits, jemalloc": (0, "off", "jemalloc"),
    "chunked, jemalloc": (64, "off", "jemalloc"),
    "chunked + checkpointing, glibc": (64, "on", "glibc"),
    "chunked + checkpointing, malloc thresholds": (64, "on", "thresholds"),
    "chunked + checkpointing, jemalloc": (64, "on", "jemalloc"),
}
BASELINE = "full logits, glibc"
DEFAULT_MODE = "full logits, jemalloc"  # what a worker does with the default settings
# the least memory on the trainers' allocator, and the share of the baseline's peak it should keep under
LEAN_MODE = "chunked + checkpointing, jemalloc"
LEAN_TARGET = 0.40
# glibc keeps freed blocks below its self-raising (up to 32 MiB) mmap threshold in the heap, so
# the resident set stays at the high-water mark of transient buffers; fixed thresholds give
# large tensors their own mappings, returned when freed (at a large cost in page faults)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def vmhwm_mib() -> float:
    peak = peak_rss_mib(os.getpid())
    if peak is None:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return peak


def request(vocab: int) -> bytes:
    """The bench batch as the protobuf ``forward_backward`` request a worker receives."""
    return sft_request(batch_tokens(vocab))


def measure(m: TrainingModel, steps: int) -> dict:
    """A warm-up step, then ``steps`` measured ones on the created model ``m``: the peak RSS of
    the measured steps (VmHWM reset after the warm-up), their median time, every loss."""
    from data_plane.wire import op_bodies
    from data_plane.wire import tinker_wire_pb2 as pb

    raw = request(m.vocab_size)
    adam = op_bodies.OptimStepBody(op_bodies.AdamSpec(learning_rate=LR))

    def step() -> float:
        out = pb.ForwardBackwardOutput.FromString(m.forward_backward(raw))
        m.optim_step(adam)
        return float(out.metrics["loss:sum"])

    losses = [step()]  # warm-up
    reset_peak_rss(os.getpid())  # VmHWM from here: the steps alone
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {"steps_peak_mib": vmhwm_mib(), "step_s": statistics.median(times), "losses": losses, "vocab": m.vocab_size}


def new_model(
    base: Any, store: str, chunk_mib: int, checkpointing: str, group: Any = None, create: bool = True
) -> TrainingModel:
    """The trainer's model on ``base`` (with the bench LoRA adapter created unless ``create`` is
    false: a follower rank gets it from the leader)."""
    import torch

    from data_plane.storage.local import LocalDirStore
    from data_plane.trainer.training import TrainingModel
    from data_plane.wire import op_bodies

    m = TrainingModel(
        model_id="bench",
        base_model_name="openloops/bench",
        base=base,
        device=torch.device("cpu"),
        store=LocalDirStore(Path(store)),
        max_seq_len=SEQ + 1,
        microbatch_tokens=8192,
        logits_chunk_bytes=chunk_mib << 20,
        activation_checkpointing=checkpointing,
        logits_full_max_bytes=0,  # chunk whenever chunk_mib > 0
        group=group,
    )
    if create:
        m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=RANK, seed=0)))
    return m


def child(model_dir: str, chunk_mib: int, checkpointing: str, steps: int) -> dict:
    """One mode, in this process: returns its figures."""
    import torch

    from data_plane.trainer.model import load_base

    torch.manual_seed(0)
    base = load_base(model_dir, torch.device("cpu"), torch.float32)
    with tempfile.TemporaryDirectory() as store:
        return measure(new_model(base, store, chunk_mib, checkpointing), steps)


def allocator_env(allocator: str) -> dict[str, str]:
    if allocator == "thresholds":
        return MALLOC_ENV
    if allocator == "jemalloc":
        env = trainer_allocator_env("jemalloc", BackendKind.LOCAL)
        if not env:
            raise SystemExit("jemalloc is not installed (apt-get install libjemalloc2, or scripts/install)")
        return env
    return {}


def run_mode(model_dir: str, mode: tuple[int, str, str], steps: int) -> dict:
    """One mode in a fresh process: its figures (``step_s``, ``losses``, peaks)."""
    chunk, checkpointing, allocator = mode
    env = {k: v for k, v in os.environ.items() if k not in (*MALLOC_ENV, "LD_PRELOAD", "MALLOC_CONF")}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **allocator_env(allocator)})
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loss_memory", "--child", model_dir, str(chunk), checkpointing, str(steps)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


@dataclass(frozen=True)
class ModeFigures:
    """One mode over its rounds: the largest peaks (MiB) and the median step time (s)."""

    life_peak_mib: float
    steps_peak_mib: float
    step_s: float


def mode_figures(rounds: list[dict]) -> ModeFigures:
    return ModeFigures(
        max(x["life_peak_mib"] for x in rounds),
        max(x["steps_peak_mib"] for x in rounds),
        statistics.median(x["step_s"] for x in rounds),
    )


@dataclass(frozen=True)
class MemoryReport:
    date: str
    quick: bool
    machine: str  # bench.machine's line at the start
    end_load: float
    rounds: int
    steps: int  # measured per mode and round
    modes: dict[str, ModeFigures]  # every mode of MODES, in its order


def mode_label(name: str) -> str:
    if name == BASELINE:
        return f"{name} (baseline)"
    if name == DEFAULT_MODE:
        return f"{name} (**default at this batch**)"
    return name


def more_or_less(ratio: float, more: str, less: str) -> str:
    """``ratio - 1`` as a percentage in words: "6% more", "12% less"."""
    return f"{abs(ratio - 1):.0%} {more if ratio >= 1 else less}"


def render(report: MemoryReport) -> str:
    """The README section's body: when, where, the table, the lean configuration against the target."""
    base, lean, default = report.modes[BASELINE], report.modes[LEAN_MODE], report.modes[DEFAULT_MODE]
    merged = all(round(f.life_peak_mib) == round(f.steps_peak_mib) for f in report.modes.values())
    peak_header = "peak RSS (whole process = steps only)" if merged else "peak RSS, whole process / steps only"
    rows = []
    for name, f in report.modes.items():
        peak = f"{f.life_peak_mib:,.0f} MiB" if merged else f"{f.life_peak_mib:,.0f} / {f.steps_peak_mib:,.0f} MiB"
        vs_peak = f"{f.life_peak_mib / base.life_peak_mib:.0%}"
        rows.append(
            f"| {mode_label(name)} | {peak} | {f'**{vs_peak}**' if name == LEAN_MODE else vs_peak} "
            f"| {f.step_s:.3f} s | {f.step_s / base.step_s:.0%} |"
        )
    lean_peak = lean.life_peak_mib / base.life_peak_mib
    return "\n".join(
        [
            f"### Latest results ({report.date}{', --quick' if report.quick else ''})",
            "",
            f"{report.machine} at start, {report.end_load:.2f} at the end; {report.rounds} rounds × {report.steps} "
            "measured steps per mode.",
            "",
            f"| mode | {peak_header} | vs baseline | step, median | vs baseline |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "The lean configuration (`OPENLOOPS_TRAINER_LOGITS_FULL_MAX_MIB=0`, "
            "`OPENLOOPS_TRAINER_ACTIVATION_CHECKPOINTING=on`, jemalloc) "
            f"{'reaches' if lean_peak <= LEAN_TARGET else 'misses'} the {LEAN_TARGET:.0%} target ({lean_peak:.0%}) at "
            f"{more_or_less(lean.step_s / base.step_s, 'more', 'less')} step time than the baseline; at this batch it "
            f"is {more_or_less(lean.step_s / default.step_s, 'slower', 'faster')} than the default.",
        ]
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.loss_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 measured steps per mode, one round")
    ap.add_argument("--readme", action="store_true", help="write the results into bench/README.md (its section)")
    ap.add_argument(
        "--child", nargs=4, metavar=("MODEL_DIR", "CHUNK_MIB", "CHECKPOINTING", "STEPS"), help=argparse.SUPPRESS
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        model_dir, chunk, checkpointing, steps = args.child
        out = child(model_dir, int(chunk), checkpointing, int(steps))
        out["life_peak_mib"] = vmhwm_mib()
        print(json.dumps(out))
        return 0

    from control_plane.local_mode.models import prepare

    machine = machine_line()
    print(f"machine: {machine}", flush=True)
    steps, rounds = (2, 1) if args.quick else (5, 2)
    with tempfile.TemporaryDirectory() as d:
        model = prepare("bench", Path(d), quiet=True)
        results: dict[str, list[dict]] = {name: [] for name in MODES}
        for r in range(rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for name in order:  # alternate the order, one process per mode and round
                results[name].append(run_mode(model.source, MODES[name], steps))
                print(f"  round {r + 1} {name}: {results[name][-1]['step_s']:.3f} s/step", flush=True)
    base = results[BASELINE]
    for name, rows in results.items():
        assert all(abs(a - b) <= 1e-4 * abs(a) for p, c in zip(base, rows) for a, b in zip(p["losses"], c["losses"])), (
            f"{name}: the losses differ from {BASELINE}'s"
        )
    report = MemoryReport(
        date=datetime.date.today().isoformat(),
        quick=args.quick,
        machine=machine,
        end_load=load_average(),
        rounds=rounds,
        steps=steps,
        modes={name: mode_figures(rows) for name, rows in results.items()},
    )
    print(f"\nvocabulary {base[0]['vocab']}, {BATCH} x {SEQ} tokens, rank {RANK}; {rounds} rounds x {steps} steps")
    print(f"first-step loss: {base[0]['losses'][0]:.4f} (every mode within 1e-4 relative, every step)\n")
    publish("loss_memory", render(report), readme=args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
