"""Deleting per-step training metrics older than ``training_metrics_retention_days`` (the
controller's housekeeping step), in bounded deletes: at most ``batch`` rows per statement and
``max_batches`` statements per pass, so a large backlog never holds a long transaction; the
next pass goes on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, tuple_

from control_plane.db.engine import Database
from control_plane.db.models import TrainingMetric

BATCH = 5000
MAX_BATCHES = 20


async def prune_training_metrics(
    db: Database, retention_days: float, *, batch: int = BATCH, max_batches: int = MAX_BATCHES
) -> int:
    """Delete rows older than ``retention_days`` (0: keep everything); returns how many."""
    if retention_days <= 0:
        return 0
    cutoff = datetime.now(UTC) - timedelta(days=retention_days)
    deleted = 0
    for _ in range(max_batches):
        old = (
            select(TrainingMetric.run_id, TrainingMetric.step)
            .where(TrainingMetric.time < cutoff)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        async with db.transaction() as s:
            result = await s.execute(
                delete(TrainingMetric)
                .where(tuple_(TrainingMetric.run_id, TrainingMetric.step).in_(old))
                .execution_options(synchronize_session=False)
            )
        n = int(getattr(result, "rowcount", 0) or 0)
        deleted += n
        if n < batch:
            break
    return deleted
