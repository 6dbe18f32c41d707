"""LocalProcessBackend: a process stopped for scale-to-zero is never reported as failed, not
even while it is still shutting down (the controller observes concurrently)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import Phase, WorkloadRole, WorkloadSpec

# takes half a second to shut down on SIGTERM, like a server draining
SLOW_STOP = (
    "import signal, sys, time\n"
    "def bye(*_):\n"
    "    time.sleep(0.5)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "print('up', flush=True)\n"
    "time.sleep(120)\n"
)


async def test_scale_to_zero_is_never_observed_as_a_failure(tmp_path: Path) -> None:
    backend = LocalProcessBackend(tmp_path / "workers")
    role = WorkloadRole.SERVED_MODEL
    try:
        await backend.ensure(WorkloadSpec("dep-1", role, "org-1", None, "m", command=["python", "-c", SLOW_STOP]))
        log = tmp_path / "workers" / "served-model-dep-1.log"
        deadline = time.monotonic() + 30
        while "up" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the workload never started"
            await asyncio.sleep(0.05)
        pid = backend.pid("dep-1", role)

        scaling = asyncio.create_task(backend.scale("dep-1", role, 0))
        seen = set()
        while not scaling.done():  # observe as often as the loop lets us while it stops
            seen.add((await backend.observe("dep-1", role)).phase)
            await asyncio.sleep(0)
        await scaling
        assert Phase.FAILED not in seen, seen
        assert (await backend.observe("dep-1", role)).phase == Phase.SCALED_DOWN
        assert pid is not None and backend.pid("dep-1", role) is None

        await backend.scale("dep-1", role, 1)  # and it comes back
        assert (await backend.observe("dep-1", role)).phase != Phase.SCALED_DOWN
    finally:
        await backend.close()
