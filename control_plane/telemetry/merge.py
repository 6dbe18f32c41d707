"""How the ops of one optimizer step become one row of metrics.

An op (:class:`~data_plane.wire.telemetry.OpTelemetry`) contributes:

- ``forward_backward``: every metric of its answer as it is (Tinker ``loss:sum``,
  ``num_tokens:sum``, ``…:mean``; Loops ``loss``, ``num_tokens``, …), ``tokens`` (the tokens it
  ran) and ``step_time_s`` (its time in the worker);
- ``forward`` (forward-only, an evaluation): its metrics and tokens under a ``forward/`` prefix
  (``forward/loss:sum``, ``forward/tokens``) and ``forward/time_s``, so that they never mix
  with the training loss;
- ``optim_step``: its metrics (``grad_norm:mean``, ``learning_rate:mean``,
  ``grad_clipped:mean``), the same as ``grad_norm`` and ``learning_rate``, and ``step_time_s``.

Merging the ops of a step: a metric whose name (after any ``forward/``) ends in ``:sum`` or is
``tokens``, ``num_tokens``, ``num_pairs``, ``step_time_s``, ``time_s`` or ``ops`` is summed;
any other keeps the value of the op with the highest seq that reported it (the last one).
``ops`` counts the ops merged, and ``tokens_per_s`` = ``tokens`` / ``step_time_s`` is derived
after every merge. An op whose seq is already in the row's ``seqs`` is skipped: delivering an
entry twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from data_plane.wire.telemetry import OpTelemetry, TelemetryKind

FORWARD_PREFIX = "forward/"
SUMMED = frozenset({"tokens", "num_tokens", "num_pairs", "step_time_s", "time_s", "ops"})
Metrics = dict[str, Any]


def summed(name: str) -> bool:
    base = name.removeprefix(FORWARD_PREFIX)
    return base.endswith(":sum") or base in SUMMED


def contribution(op: OpTelemetry) -> Metrics:
    """What one op adds to its step's row."""
    if op.kind == TelemetryKind.FORWARD:
        out: Metrics = {FORWARD_PREFIX + k: v for k, v in op.metrics.items()}
        out[FORWARD_PREFIX + "tokens"] = op.tokens
        out[FORWARD_PREFIX + "time_s"] = op.duration_s
    else:
        out = dict(op.metrics)
        out["step_time_s"] = op.duration_s
        if op.kind == TelemetryKind.OPTIM_STEP:
            out["grad_norm"] = op.metrics.get("grad_norm:mean")
            out["learning_rate"] = op.metrics.get("learning_rate:mean")
        else:
            out["tokens"] = op.tokens
    out["ops"] = 1
    return out


def merge(metrics: Metrics, seqs: list[int], ops: Iterable[OpTelemetry]) -> tuple[Metrics, list[int]]:
    """``metrics`` and ``seqs`` of a row with ``ops`` (of that row's run and step) merged in."""
    merged = dict(metrics)
    done = set(seqs)
    last = max(done, default=-1)
    for op in sorted(ops, key=lambda o: o.seq):
        if op.seq in done:
            continue
        for name, value in contribution(op).items():
            if summed(name):
                merged[name] = (merged.get(name) or 0) + value if value is not None else merged.get(name)
            elif op.seq > last or name not in merged:
                merged[name] = value
        done.add(op.seq)
        last = max(last, op.seq)
    tokens, seconds = merged.get("tokens"), merged.get("step_time_s")
    if isinstance(tokens, int | float) and isinstance(seconds, int | float) and seconds > 0 and tokens:
        merged["tokens_per_s"] = tokens / seconds
    return merged, sorted(done)
