"""Backoff for transient backend errors, per workload.

The controller calls the backend once per pass. A :class:`TransientBackendError` (API server
unreachable, 5xx after the backend's own retries) is not the workload's fault: the controller
skips that workload until its backoff expires and tries again. Only when a workload has kept
failing for ``attempts`` tries or ``max_seconds`` does the caller give up (DEPLOY_FAILED, with
the last error as the reason). Any other error is permanent at once.

State is per controller process: a new leader starts counting afresh (at worst the budget
doubles across a failover).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from control_plane.settings import Settings


@dataclass
class _Failing:
    first: float
    attempts: int
    next_at: float
    last_error: str


class BackendRetry:
    def __init__(
        self,
        *,
        attempts: int,
        max_seconds: float,
        base_delay: float,
        max_delay: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attempts = attempts
        self.max_seconds = max_seconds
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._failing: dict[Hashable, _Failing] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> BackendRetry:
        return cls(
            attempts=settings.backend_retry_attempts,
            max_seconds=settings.backend_retry_max_seconds,
            base_delay=settings.backend_retry_base_delay_seconds,
            max_delay=settings.backend_retry_max_delay_seconds,
        )

    def due(self, key: Hashable) -> bool:
        """False while ``key`` is backing off after a transient failure."""
        f = self._failing.get(key)
        return f is None or self._clock() >= f.next_at

    def failed(self, key: Hashable, error: BaseException | str) -> str | None:
        """Record a transient failure. Returns ``None`` to retry later, or the reason to give
        up with once the budget is spent."""
        now = self._clock()
        f = self._failing.get(key)
        if f is None:
            f = self._failing[key] = _Failing(first=now, attempts=0, next_at=now, last_error="")
        f.attempts += 1
        f.last_error = str(error)
        elapsed = now - f.first
        if f.attempts >= self.attempts or elapsed >= self.max_seconds:
            self._failing.pop(key, None)
            return f"gave up after {f.attempts} attempts over {elapsed:.0f}s: {f.last_error}"
        delay = min(self.max_delay, self.base_delay * 2 ** (f.attempts - 1))
        f.next_at = now + delay * (0.5 + random.random() / 2)
        return None

    def succeeded(self, key: Hashable) -> None:
        self._failing.pop(key, None)

    def attempts_of(self, key: Hashable) -> int:
        f = self._failing.get(key)
        return f.attempts if f else 0
