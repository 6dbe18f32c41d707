"""Trainer memory and step time, full logits vs chunked log-probabilities:
``python -m bench.loss_memory [--quick]``.

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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.batch import BATCH, LR, RANK, SEQ, batch_tokens, sft_request
from bench.proc_memory import peak_rss_mib, reset_peak_rss

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
    "full logits, jemalloc (default)": (0, "off", "jemalloc"),
    "chunked, jemalloc": (64, "off", "jemalloc"),
    "chunked + checkpointing, glibc": (64, "on", "glibc"),
    "chunked + checkpointing, malloc thresholds": (64, "on", "thresholds"),
    "chunked + checkpointing, jemalloc": (64, "on", "jemalloc"),
}
BASELINE = "full logits, glibc"
DEFAULT_MODE = "full logits, jemalloc (default)"  # what a worker does with the default settings
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 measured steps per mode, one round")
    ap.add_argument(
        "--child", nargs=4, metavar=("MODEL_DIR", "CHUNK_MIB", "CHECKPOINTING", "STEPS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        model_dir, chunk, checkpointing, steps = args.child
        out = child(model_dir, int(chunk), checkpointing, int(steps))
        out["life_peak_mib"] = vmhwm_mib()
        print(json.dumps(out))
        return

    from control_plane.local_mode.models import prepare

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
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

    def worst(rows: list[dict], key: str) -> float:
        return max(x[key] for x in rows)

    def med(rows: list[dict]) -> float:
        return statistics.median(x["step_s"] for x in rows)

    print(f"\nvocabulary {base[0]['vocab']}, {BATCH} x {SEQ} tokens, rank {RANK}; {rounds} rounds x {steps} steps\n")
    print(f"| mode | peak RSS, whole process | peak RSS, steps only | vs {BASELINE} | step, median | vs {BASELINE} |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        life, steps_peak, t = worst(rows, "life_peak_mib"), worst(rows, "steps_peak_mib"), med(rows)
        print(
            f"| {name} | {life:,.0f} MiB | {steps_peak:,.0f} MiB | {life / worst(base, 'life_peak_mib'):.0%} "
            f"| {t:.3f} s | {t / med(base):.0%} |"
        )
    print(f"\nfirst-step loss: {base[0]['losses'][0]:.4f} (every mode within 1e-4 relative, every step)")


if __name__ == "__main__":
    main()
