"""Reading a run's per-step metrics (``GET /v1/loops/runs/{run_id}/training_metrics``).

Steps in ``[start_step, end_step]`` come in step order, ``limit`` at a time; ``next_cursor``
(opaque) continues after the page's last step, ``null`` after the last page. With
``max_points`` and more steps than that in the range, the range is downsampled instead, in
one answer without a cursor: its steps (in order) are split into ``max_points`` buckets of
consecutive steps whose sizes differ by at most one (step number ``i`` of ``n``, from 0, goes
to bucket ``i * max_points // n``); a bucket's point is the mean of each numeric metric over the
bucket's steps that have it (non-numeric metrics are dropped), at the bucket's last step and
that step's time. Averaging happens in Postgres: a long run's rows never leave it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import TrainingMetric
from control_plane.errors import InvalidInput

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MAX_POINTS = 10_000
MAX_STEP = 2**31 - 1


@dataclass(frozen=True)
class StepPoint:
    step: int
    time: datetime
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Page:
    steps: list[StepPoint]
    next_cursor: str | None
    downsampled: bool


def encode_cursor(after_step: int) -> str:
    return base64.urlsafe_b64encode(f"step:{after_step}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = raw.partition(":")
        if kind != "step":
            raise ValueError(kind)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("cursor is not a cursor this endpoint returned", field="cursor") from None


async def training_metrics(
    s: AsyncSession,
    run_id: str,
    *,
    start_step: int | None = None,
    end_step: int | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    max_points: int | None = None,
) -> Page:
    lo = 0 if start_step is None else start_step
    hi = MAX_STEP if end_step is None else end_step
    if lo > hi:
        raise InvalidInput("start_step must not be after end_step", field="start_step")
    if cursor is not None:
        lo = max(lo, decode_cursor(cursor) + 1)
    in_range = (TrainingMetric.run_id == run_id, TrainingMetric.step >= lo, TrainingMetric.step <= hi)
    if max_points is not None:
        total = (await s.execute(select(func.count()).select_from(TrainingMetric).where(*in_range))).scalar_one()
        if total > max_points:
            return Page(await _downsampled(s, run_id, lo, hi, total, max_points), None, True)
    rows = (
        await s.execute(
            select(TrainingMetric.step, TrainingMetric.time, TrainingMetric.metrics)
            .where(*in_range)
            .order_by(TrainingMetric.step)
            .limit(limit + 1)
        )
    ).all()
    steps = [StepPoint(step, time, metrics) for step, time, metrics in rows[:limit]]
    more = len(rows) > limit
    return Page(steps, encode_cursor(steps[-1].step) if more else None, False)


_DOWNSAMPLE = text(
    """
    WITH r AS (
        SELECT step, time, metrics,
               ((row_number() OVER (ORDER BY step) - 1) * :points / :total) AS b
        FROM training_metrics
        WHERE run_id = :run_id AND step BETWEEN :lo AND :hi
    ),
    ends AS (
        SELECT b, max(step) AS step, (array_agg(time ORDER BY step DESC))[1] AS time
        FROM r GROUP BY b
    ),
    means AS (
        SELECT r.b, kv.key, avg((kv.value #>> '{}')::double precision) AS v
        FROM r CROSS JOIN LATERAL jsonb_each(r.metrics) AS kv
        WHERE jsonb_typeof(kv.value) = 'number'
        GROUP BY r.b, kv.key
    )
    SELECT ends.step, ends.time,
           coalesce(jsonb_object_agg(means.key, means.v) FILTER (WHERE means.key IS NOT NULL), '{}'::jsonb)
    FROM ends LEFT JOIN means ON means.b = ends.b
    GROUP BY ends.b, ends.step, ends.time
    ORDER BY ends.step
    """
)


async def _downsampled(s: AsyncSession, run_id: str, lo: int, hi: int, total: int, points: int) -> list[StepPoint]:
    rows = await s.execute(_DOWNSAMPLE, {"run_id": run_id, "lo": lo, "hi": hi, "total": total, "points": points})
    return [StepPoint(step, time, metrics) for step, time, metrics in rows.all()]
