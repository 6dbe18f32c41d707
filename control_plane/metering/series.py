"""The ten metric series of a Loops deployment (``POST /v1/loops/deployments/{id}/metrics``),
from its request counters (:mod:`.requests`) and resource samples (:mod:`.usage`).

Every series covers ``[start, end)`` in steps of ``step_seconds`` (a multiple of 60: request
counters are per minute); a step without data has no point. A point is ``{"timestamp": ISO
8601 of the step's start, "value": ...}`` (request latency points carry ``p50``/``p95``/``p99``
in milliseconds, status points ``status_2xx``/``_4xx``/``_5xx``). Resource series are the sum
over the workload's replicas at each sample time, averaged over the samples of a step.
``time_divisor_seconds`` turns the request volumes into rates: requests per that many seconds
instead of per step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import RequestBucket, UsageSample
from control_plane.errors import InvalidInput
from control_plane.metering.requests import LATENCY_BUCKETS_MS

MAX_POINTS = 2000
MAX_STEP_SECONDS = 2**31 - 1
DEFAULT_WINDOW = timedelta(hours=1)
Point = dict[str, Any]


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    step: int  # seconds
    divisor: int | None

    @classmethod
    def parse(
        cls, start_ms: int | None, end_ms: int | None, step_seconds: int | None, time_divisor_seconds: int | None
    ) -> Window:
        end = _from_ms(end_ms, "end_epoch_millis") if end_ms is not None else datetime.now(UTC)
        start = _from_ms(start_ms, "start_epoch_millis") if start_ms is not None else end - DEFAULT_WINDOW
        if start >= end:
            raise InvalidInput("start_epoch_millis must be before end_epoch_millis", field="start_epoch_millis")
        step = step_seconds or 60
        if step < 60 or step % 60:
            raise InvalidInput("step_seconds must be a positive multiple of 60", field="step_seconds")
        if (end - start).total_seconds() / step > MAX_POINTS:
            raise InvalidInput(
                f"the window holds more than {MAX_POINTS} steps; raise step_seconds", field="step_seconds"
            )
        if time_divisor_seconds is not None and time_divisor_seconds < 1:
            raise InvalidInput("time_divisor_seconds must be >= 1", field="time_divisor_seconds")
        return cls(start, end, step, time_divisor_seconds)

    def index(self, t: datetime) -> int:
        return int((t - self.start).total_seconds() // self.step)

    def stamp(self, idx: int) -> str:
        return (self.start + timedelta(seconds=idx * self.step)).isoformat()

    def rate(self, count: int) -> float:
        return count if self.divisor is None else count * self.divisor / self.step


def _from_ms(ms: int, field: str) -> datetime:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidInput(f"{field} is out of range", field=field) from None


def percentile(hist: list[int], q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile ``q`` (None without data)."""
    total = sum(hist)
    if total == 0:
        return None
    acc = 0
    for i, c in enumerate(hist):
        acc += c
        if acc >= q * total:
            return float(LATENCY_BUCKETS_MS[min(i, len(LATENCY_BUCKETS_MS) - 1)])
    return float(LATENCY_BUCKETS_MS[-1])


TOKEN_SERIES = ("samples", "prompt_tokens", "completion_tokens")


async def request_series(
    s: AsyncSession, resource_type: str, resource_id: str, w: Window, *, tokens: bool = False
) -> dict[str, list[Point]]:
    """The four request series; with ``tokens`` also ``samples``, ``prompt_tokens`` and
    ``completion_tokens`` (per step, or per ``time_divisor_seconds`` like the volumes)."""
    rows = (
        await s.execute(
            select(RequestBucket)
            .where(
                RequestBucket.resource_type == resource_type,
                RequestBucket.resource_id == resource_id,
                RequestBucket.bucket_start >= w.start,
                RequestBucket.bucket_start < w.end,
            )
            .order_by(RequestBucket.bucket_start)
        )
    ).scalars()
    steps: dict[int, dict[str, Any]] = {}
    for r in rows:
        a = steps.setdefault(
            w.index(r.bucket_start),
            {"c2": 0, "c4": 0, "c5": 0, "conc": 0, "hist": [0] * len(r.latency_hist), **dict.fromkeys(TOKEN_SERIES, 0)},
        )
        for k in TOKEN_SERIES:
            a[k] += getattr(r, k)
        a["c2"] += r.count_2xx
        a["c4"] += r.count_4xx
        a["c5"] += r.count_5xx
        a["conc"] = max(a["conc"], r.max_concurrent)
        a["hist"] = [x + y for x, y in zip(a["hist"], r.latency_hist, strict=True)]
    names = ("inference_volume", "concurrent_requests", "response_time_stats", "inference_volume_by_status")
    out: dict[str, list[Point]] = {k: [] for k in names + (TOKEN_SERIES if tokens else ())}
    for idx in sorted(steps):
        a, ts = steps[idx], w.stamp(idx)
        if tokens:
            for k in TOKEN_SERIES:
                out[k].append({"timestamp": ts, "value": w.rate(a[k])})
        out["inference_volume"].append({"timestamp": ts, "value": w.rate(a["c2"] + a["c4"] + a["c5"])})
        out["concurrent_requests"].append({"timestamp": ts, "value": a["conc"]})
        if any(a["hist"]):  # a step whose only row holds a request still in flight has no latency yet
            out["response_time_stats"].append(
                {
                    "timestamp": ts,
                    "p50": percentile(a["hist"], 0.5),
                    "p95": percentile(a["hist"], 0.95),
                    "p99": percentile(a["hist"], 0.99),
                }
            )
        out["inference_volume_by_status"].append(
            {
                "timestamp": ts,
                "status_2xx": w.rate(a["c2"]),
                "status_4xx": w.rate(a["c4"]),
                "status_5xx": w.rate(a["c5"]),
            }
        )
    return out


class _Resource:
    """Sums over replicas per sample time, then averages per step."""

    def __init__(self, w: Window) -> None:
        self.w = w
        self.at: dict[str, dict[datetime, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, name: str, at: datetime, value: float | None) -> None:
        if value is not None:
            self.at[name][at] += value

    def series(self, name: str) -> list[Point]:
        per_step: dict[int, list[float]] = defaultdict(list)
        for at, v in self.at.get(name, {}).items():
            per_step[self.w.index(at)].append(v)
        return [{"timestamp": self.w.stamp(i), "value": sum(vs) / len(vs)} for i, vs in sorted(per_step.items())]

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.at if n.startswith(prefix))


def _resource_block(res: _Resource) -> dict[str, Any]:
    ranks = sorted({n.split(":", 2)[1] for n in res.names("gpu_mem:") + res.names("gpu_util:")}, key=_rank_key)
    capacity = res.series("eph_cap")
    usage = res.series("eph")
    by_ts = {p["timestamp"]: p["value"] for p in capacity}
    utilization = [
        {"timestamp": p["timestamp"], "value": p["value"] / by_ts[p["timestamp"]]}
        for p in usage
        if by_ts.get(p["timestamp"])
    ]
    return {
        "gpu_memory_usage_bytes": {r: res.series(f"gpu_mem:{r}") for r in ranks if res.series(f"gpu_mem:{r}")},
        "gpu_utilization": {r: res.series(f"gpu_util:{r}") for r in ranks if res.series(f"gpu_util:{r}")},
        "cpu_usage": res.series("cpu"),
        "cpu_memory_usage_bytes": res.series("mem"),
        "ephemeral_storage": {"usage_bytes": usage, "utilization": utilization},
    }


def _rank_key(rank: str) -> tuple[int, str]:
    return (int(rank), rank) if rank.isdigit() else (1 << 30, rank)


async def usage_series(s: AsyncSession, resource_type: str, resource_id: str, w: Window) -> dict[str, Any]:
    rows = (
        await s.execute(
            select(UsageSample)
            .where(
                UsageSample.resource_type == resource_type,
                UsageSample.resource_id == resource_id,
                UsageSample.at >= w.start,
                UsageSample.at < w.end,
            )
            .order_by(UsageSample.at)
        )
    ).scalars()
    total = _Resource(w)
    nodes: dict[str, _Resource] = defaultdict(lambda: _Resource(w))
    for r in rows:
        for res in (total, nodes[r.node or r.replica]):
            res.add("cpu", r.at, r.cpu_cores)
            res.add("mem", r.at, r.memory_bytes)
            res.add("eph", r.at, r.ephemeral_bytes)
            res.add("eph_cap", r.at, r.ephemeral_capacity_bytes)
            for rank, g in (r.gpus or {}).items():
                res.add(f"gpu_mem:{rank}", r.at, g.get("memory_bytes"))
                res.add(f"gpu_util:{rank}", r.at, g.get("utilization"))
    block = _resource_block(total)
    block["per_node_metrics"] = [{"node_id": node, **_resource_block(res)} for node, res in sorted(nodes.items())]
    return block


async def deployment_metrics(s: AsyncSession, resource_type: str, resource_id: str, w: Window) -> dict[str, Any]:
    """All ten series (every key present, empty when there is no data)."""
    return {
        **await request_series(s, resource_type, resource_id, w),
        **await usage_series(s, resource_type, resource_id, w),
    }


async def sampling_totals(s: AsyncSession, resource_type: str, resource_id: str, w: Window) -> dict[str, int]:
    """Sums over the window: ``requests``, ``errors`` (4xx and 5xx) and the token counters."""
    b = RequestBucket
    row = (
        await s.execute(
            select(
                func.coalesce(func.sum(b.count_2xx + b.count_4xx + b.count_5xx), 0),
                func.coalesce(func.sum(b.count_4xx + b.count_5xx), 0),
                *(func.coalesce(func.sum(getattr(b, k)), 0) for k in TOKEN_SERIES),
            ).where(
                b.resource_type == resource_type,
                b.resource_id == resource_id,
                b.bucket_start >= w.start,
                b.bucket_start < w.end,
            )
        )
    ).one()
    return dict(zip(("requests", "errors", *TOKEN_SERIES), (int(v) for v in row), strict=True))
