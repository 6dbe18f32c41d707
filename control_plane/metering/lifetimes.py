"""When workloads ran, from their status history: the intervals usage bills.

A deployment (a trainer), a sampler row or a served model runs from the moment the controller
observes its workload started (:data:`RUNNING`: loading its model, active, unhealthy, updating,
waking up or restarting, and ``DEACTIVATING`` while it is being stopped) until the first status
after that in which nothing runs (scaled to zero, inactive, failed). ``DEPLOYING`` is not
running: the workload was asked for and not seen started yet (a process spawning, a pod being
scheduled). The controller writes those transitions on the pass that observes them, so the
intervals are the observed lifetime, not the requested one, to within a pass at each end.
Interval arithmetic here is on half-open ``[start, end)`` pairs of aware datetimes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta

from control_plane.statuses import LIVE, Status

RUNNING = frozenset({*(s.value for s in LIVE if s != Status.DEPLOYING), Status.DEACTIVATING.value})
Interval = tuple[datetime, datetime]


def running_intervals(changes: Iterable[tuple[datetime, str]], until: datetime) -> list[Interval]:
    """The intervals of one resource's status changes (``(at, to_status)``, in order) during
    which it ran; one still running at its last change runs until ``until``."""
    out: list[Interval] = []
    opened: datetime | None = None
    for at, to in changes:
        if to in RUNNING:
            if opened is None:
                opened = at
        elif opened is not None:
            out.append((opened, at))
            opened = None
    if opened is not None and opened < until:
        out.append((opened, until))
    return out


def clip(intervals: Iterable[Interval], start: datetime, end: datetime) -> list[Interval]:
    """The parts of ``intervals`` inside ``[start, end)``."""
    return [(max(a, start), min(b, end)) for a, b in intervals if a < end and b > start]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Overlapping or touching intervals merged, in order."""
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def seconds(intervals: Iterable[Interval]) -> float:
    return sum((b - a).total_seconds() for a, b in intervals)


def by_day(intervals: Sequence[Interval]) -> dict[date, float]:
    """Seconds of ``intervals`` per UTC day (they must be UTC-aware)."""
    out: dict[date, float] = {}
    for a, b in intervals:
        day = a.date()
        while True:
            day_end = datetime.combine(day + timedelta(days=1), time(), a.tzinfo)
            part_end = min(b, day_end)
            lo = max(a, datetime.combine(day, time(), a.tzinfo))
            if part_end > lo:
                out[day] = out.get(day, 0.0) + (part_end - lo).total_seconds()
            if b <= day_end:
                break
            day += timedelta(days=1)
    return out
