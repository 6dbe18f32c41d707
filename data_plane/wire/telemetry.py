"""One executed training op's metrics, as the worker reports them on ``TELEMETRY_STREAM``
(:mod:`data_plane.wire.queue`).

The worker appends one entry per ``forward_backward`` (``forward`` when forward-only) and
``optim_step`` it answers, in the same Redis transaction that writes the op's answer; an op
whose answer an earlier worker already gave (a replay after a crash) writes none. ``step`` is
the optimizer step the op belongs to: the optimizer steps taken before it, plus one (the
forward_backward calls before the N-th ``optim_step`` belong to step N, like that optim_step).
``(run_id, seq)`` names the op: the control plane counts an op once however often its entry
is delivered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum

from data_plane.wire.queue import Fields, OutFields


class TelemetryKind(StrEnum):
    FORWARD_BACKWARD = "forward_backward"
    FORWARD = "forward"  # forward_backward with forward_only (an evaluation: no gradients)
    OPTIM_STEP = "optim_step"


@dataclass(frozen=True, slots=True)
class OpTelemetry:
    run_id: str
    seq: int
    kind: TelemetryKind
    step: int
    time: float  # epoch seconds when the op finished
    duration_s: float  # the model call's time in the worker
    tokens: int  # tokens the op ran through the model (0 for optim_step)
    metrics: dict[str, float | None] = field(default_factory=dict)  # the answer's metrics (null: not finite)

    def to_fields(self) -> OutFields:
        return {
            "run_id": self.run_id,
            "seq": self.seq,
            "kind": self.kind.value,
            "step": self.step,
            "time": f"{self.time:.6f}",
            "duration_s": f"{self.duration_s:.6f}",
            "tokens": self.tokens,
            "metrics": json.dumps(self.metrics, separators=(",", ":")),
        }

    @classmethod
    def from_fields(cls, fields: Fields) -> OpTelemetry:
        metrics = json.loads(fields[b"metrics"])
        if not isinstance(metrics, dict):
            raise ValueError("metrics must be a JSON object")
        return cls(
            run_id=fields[b"run_id"].decode(),
            seq=int(fields[b"seq"]),
            kind=TelemetryKind(fields[b"kind"].decode()),
            step=int(fields[b"step"]),
            time=float(fields[b"time"]),
            duration_s=float(fields[b"duration_s"]),
            tokens=int(fields[b"tokens"]),
            metrics=metrics,
        )
