"""Writing a batch of telemetry entries into ``training_metrics``, in one transaction.

Three statements per batch, whatever its size: an ``INSERT … ON CONFLICT DO NOTHING`` of the
missing (run, step) rows, a ``SELECT … FOR UPDATE`` of all the batch's rows (in key order, so
concurrent writers never deadlock), and one bulk ``UPDATE`` with the merged metrics
(:mod:`.merge`). The row lock serializes writers of the same step (several API processes
consume the stream), and a row's ``seqs`` make a redelivered entry a no-op. Entries of runs
that no longer exist are dropped.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from sqlalchemy import select, tuple_, update
from sqlalchemy.dialects.postgresql import insert

from control_plane.db.engine import Database
from control_plane.db.models import Run, TrainingMetric
from control_plane.telemetry.merge import merge
from data_plane.wire.telemetry import OpTelemetry

Key = tuple[str, int]


async def write_batch(db: Database, ops: list[OpTelemetry]) -> int:
    """Merge ``ops`` into their steps' rows; returns how many rows were touched."""
    by_key: dict[Key, list[OpTelemetry]] = defaultdict(list)
    for op in ops:
        by_key[(op.run_id, op.step)].append(op)
    if not by_key:
        return 0
    async with db.transaction() as s:
        run_ids = sorted({run_id for run_id, _ in by_key})
        orgs = dict((await s.execute(select(Run.id, Run.org_id).where(Run.id.in_(run_ids)))).tuples().all())
        keys = sorted(k for k in by_key if k[0] in orgs)
        if not keys:
            return 0
        fresh = [
            {
                "run_id": run_id,
                "step": step,
                "org_id": orgs[run_id],
                "time": _time(max(o.time for o in by_key[(run_id, step)])),
                "metrics": {},
                "seqs": [],
            }
            for run_id, step in keys
        ]
        await s.execute(insert(TrainingMetric).values(fresh).on_conflict_do_nothing())
        rows = (
            await s.execute(
                select(
                    TrainingMetric.run_id,
                    TrainingMetric.step,
                    TrainingMetric.time,
                    TrainingMetric.metrics,
                    TrainingMetric.seqs,
                )
                .where(tuple_(TrainingMetric.run_id, TrainingMetric.step).in_(keys))
                .order_by(TrainingMetric.run_id, TrainingMetric.step)
                .with_for_update()
            )
        ).all()
        changes = []
        for run_id, step, time, metrics, seqs in rows:
            batch = by_key[(run_id, step)]
            merged, done = merge(metrics, list(seqs), batch)
            if done == sorted(seqs):
                continue  # every op of the batch was in already
            latest = max(time, _time(max(o.time for o in batch)))
            changes.append({"run_id": run_id, "step": step, "metrics": merged, "seqs": done, "time": latest})
        if changes:
            await s.execute(update(TrainingMetric), changes)
    return len(changes)


def _time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
