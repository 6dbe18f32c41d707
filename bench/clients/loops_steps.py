"""The Loops-SDK side of ``bench.trainer_sdk``: ``<loops venv python> loops_steps.py CONFIG.json``.

Run by bench/loops_sdk.py with the interpreter of the Loops client venv (``.venvs/loops-client``,
built by ``scripts/install test``: ``baseten-loops`` needs Python 3.12), so it imports nothing
from this repository. The unmodified SDK reaches the server the way any Loops program does,
through LOOPS_BASE_URL and BASETEN_API_KEY. CONFIG.json holds ``model``, ``rank``, ``lr``,
``steps``, ``warmup``, ``rounds``, ``small_warmup``, ``rows`` (the token rows of the training
batch: each row is a sequence's inputs plus its last target) and ``small`` (one such row for the
small forward).

What it does: ``ServiceClient().create_lora_training_client`` (the SDK provisions a Loops run and
waits for its trainer), ``warmup`` + ``steps`` steps of ``forward_backward`` + ``optim_step`` on
the batch (cross-entropy on every next token, weight 1; AdamW without gradient clipping, as the
tinker SDK's defaults), both ops submitted before either result is read, then ``small_warmup`` +
``rounds`` round trips of a ``forward`` of the small row. Progress goes to stderr; the result is
one JSON object on the last line of stdout (times in seconds):

``sdk``, ``run_id``, ``ready_s`` (create -> trainer ready), ``first_step_s`` (create -> first
step done), ``warmup_step_times``, ``step_times``, ``losses`` (the SDK's ``loss`` of every step,
the mean over the batch's tokens), ``tokens`` (per step) and ``small_op_times``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def datum(loops: Any, row: list[int]) -> Any:
    """A Loops datum of one token row: inputs ``row[:-1]``, cross-entropy on the next tokens."""
    n = len(row) - 1
    return loops.Datum(
        model_input=loops.ModelInput.from_ints(row[:-1]),
        loss_fn_inputs={
            "target_tokens": loops.TensorData(data=row[1:], dtype="int64", shape=[n]),
            "weights": loops.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    loops = importlib.import_module("baseten.loops")
    steps, warmup = int(cfg["steps"]), int(cfg["warmup"])
    batch = [datum(loops, [int(t) for t in row]) for row in cfg["rows"]]
    small = [datum(loops, [int(t) for t in cfg["small"]])]
    tokens = sum(len(row) - 1 for row in cfg["rows"])
    # the tinker SDK's AdamParams defaults (the Loops SDK's clip the gradient norm at 1.0)
    adam = loops.AdamParams(
        learning_rate=float(cfg["lr"]), beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0
    )

    service = loops.ServiceClient()
    t0 = time.perf_counter()
    tc = service.create_lora_training_client(cfg["model"], rank=int(cfg["rank"]), seed=0, name="bench-trainer-sdk")
    ready_s = time.perf_counter() - t0
    log(f"  training client ready in {ready_s:.1f}s (run {tc.run_id}: worker start + base model load)")
    first_step_s: float | None = None
    times: list[float] = []
    losses: list[float] = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(adam)
        loss = float(fb.result().loss)
        opt.result()
        dt = time.perf_counter() - t
        if first_step_s is None:
            first_step_s = time.perf_counter() - t0
        losses.append(loss)
        times.append(dt)
        log(
            f"  Loops step {i}: {dt:.3f}s loss={loss:.4f} (x {tokens} tokens = {loss * tokens:.1f})"
            f"{' (warm-up)' if i < warmup else ''}"
        )
    small_times: list[float] = []
    for i in range(int(cfg["small_warmup"]) + int(cfg["rounds"])):
        t = time.perf_counter()
        tc.forward(small, "cross_entropy").result()
        if i >= int(cfg["small_warmup"]):
            small_times.append(time.perf_counter() - t)
    out = {
        "sdk": f"baseten-loops {loops.__version__}",
        "run_id": tc.run_id,
        "ready_s": ready_s,
        "first_step_s": first_step_s,
        "warmup_step_times": times[:warmup],
        "step_times": times[warmup:],
        "losses": losses,
        "tokens": tokens,
        "small_op_times": small_times,
    }
    tc.close()
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        log(f"usage: {Path(argv[0]).name} CONFIG.json")
        return 2
    out = run(json.loads(Path(argv[1]).read_text()))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
