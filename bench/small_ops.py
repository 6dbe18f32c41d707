"""The op path alone, for A/B runs between two checkouts: ``python -m bench.small_ops [--rounds N]``.

A fresh ``openloops serve`` (this checkout's code) on the tiny model, the unmodified tinker SDK:
``--rounds`` round trips of a 1 × 8-token ``forward`` (after 5 warm-up ones), then ``--steps``
32 × 256 steps (``forward_backward`` + ``optim_step``, the first one a warm-up). Prints the
machine, then one line: the round trip's p50 / p90 and the median step. About a minute.

To compare two revisions, check the other one out in a worktree and alternate, so the VM's
drift hits both alike (bench/README.md, "Where the time of an op goes")::

    git worktree add /tmp/base <rev>
    for i in 1 2 3; do
      (cd /tmp/base && python -m bench.small_ops); python -m bench.small_ops
    done
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from bench.batch import BATCH, LR, RANK, SEQ, batch_tokens
from bench.machine import machine_line
from bench.stack import start_stack
from bench.trainer_sdk import SMALL_OP_TOKENS, bench_model, quantile, sdk_batch, serve, small_datum


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.small_ops", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=400, help="1 x 8 forward round trips measured (default 400)")
    ap.add_argument("--steps", type=int, default=4, help="32 x 256 steps, the first a warm-up (default 4)")
    return ap


def measure(tc: Any, small: list[Any], batch: list[Any], rounds: int, steps: int) -> tuple[list[float], list[float]]:
    from tinker import types

    for _ in range(5):
        tc.forward(small, "cross_entropy").result()
    trips = []
    for _ in range(rounds):
        t = time.perf_counter()
        tc.forward(small, "cross_entropy").result()
        trips.append(time.perf_counter() - t)
    step_times = []
    for _ in range(steps):
        t = time.perf_counter()
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=LR))
        fb.result()
        opt.result()
        step_times.append(time.perf_counter() - t)
    return trips, step_times[1:]


def summary(trips: list[float], step_times: list[float]) -> str:
    step = f"{statistics.median(step_times):.3f} s" if step_times else "not measured"
    return (
        f"1 x {SMALL_OP_TOKENS} forward round trip p50 {1000 * quantile(trips, 0.5):.2f} ms, "
        f"p90 {1000 * quantile(trips, 0.9):.2f} ms ({len(trips)} rounds); "
        f"{BATCH} x {SEQ} step median {step} ({len(step_times)} steps)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.rounds < 1 or args.steps < 0:
        raise SystemExit("--rounds must be at least 1 and --steps at least 0")
    import tinker

    print(machine_line())
    stack = start_stack()
    try:
        model, vocab = bench_model(stack, "tiny")
        tokens: np.ndarray = batch_tokens(vocab)
        with serve(stack, "server-small-ops.log") as (base, key):
            service = tinker.ServiceClient(base_url=base, api_key=key)
            tc = service.create_lora_training_client(model.name, rank=RANK, seed=0).result()
            trips, step_times = measure(tc, [small_datum(tokens)], sdk_batch(tokens), args.rounds, args.steps)
            service.close("success").result()
    finally:
        stack.stop()
    print(summary(trips, step_times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
