"""Resource samples of live trainer workloads: CPU and memory of their processes or pods (from
the scheduler backend), disk they wrote, and the GPU figures their worker reports. The
controller records one row per replica every ``usage_sample_seconds`` and drops rows older
than ``usage_retention_hours``."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import delete, select

from control_plane.db.models import Deployment, UsageSample
from control_plane.scheduler.protocol import TransientBackendError, WorkloadRole
from control_plane.statuses import LIVE
from control_plane.training.queue import read_hash
from data_plane.wire import queue as q

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

log = structlog.get_logger("openloops.metering")
PRUNE_EVERY_SECONDS = 600.0


class UsageSampler:
    def __init__(self, runtime: Runtime) -> None:
        assert runtime.backend is not None
        self.r = runtime
        self.backend = runtime.backend
        self._last = 0.0
        self._last_prune = 0.0

    async def maybe_sample(self) -> int:
        """Sample every live deployment's trainer when ``usage_sample_seconds`` have passed."""
        now = time.monotonic()
        if now - self._last < self.r.settings.usage_sample_seconds:
            return 0
        self._last = now
        n = await self.sample()
        if now - self._last_prune >= PRUNE_EVERY_SECONDS:
            self._last_prune = now
            await self.prune()
        return n

    async def sample(self) -> int:
        async with self.r.db.session() as s:
            ids = list(
                (await s.execute(select(Deployment.id).where(Deployment.status.in_([x.value for x in LIVE])))).scalars()
            )
        rows: list[UsageSample] = []
        at = datetime.now(UTC)
        for dep_id in ids:
            try:
                samples = await self.backend.usage(dep_id, WorkloadRole.TRAINER)
            except TransientBackendError as exc:
                log.warning("usage sample failed; skipping", deployment_id=dep_id, error=str(exc))
                continue
            gpus = _gpus(await read_hash(self.r.redis, q.worker_state_key(dep_id)))
            for i, u in enumerate(samples):
                rows.append(
                    UsageSample(
                        resource_type="deployment",
                        resource_id=dep_id,
                        at=at,
                        replica=u.replica[:253],
                        node=u.node[:253] if u.node else None,
                        cpu_cores=u.cpu_cores,
                        memory_bytes=u.memory_bytes,
                        ephemeral_bytes=u.ephemeral_bytes,
                        ephemeral_capacity_bytes=u.ephemeral_capacity_bytes,
                        # the worker reports its GPUs; one trainer process per deployment today
                        gpus=gpus if i == 0 else None,
                    )
                )
        if rows:
            async with self.r.db.transaction() as s:
                s.add_all(rows)
        return len(rows)

    async def prune(self) -> None:
        cutoff = datetime.now(UTC) - timedelta(hours=self.r.settings.usage_retention_hours)
        async with self.r.db.transaction() as s:
            await s.execute(delete(UsageSample).where(UsageSample.at < cutoff))


def _gpus(state: dict[str, str]) -> dict[str, dict[str, float]] | None:
    raw = state.get("gpus")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
