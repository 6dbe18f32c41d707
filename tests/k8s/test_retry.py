"""The controller's backoff bookkeeping for transient backend errors (a fake clock: no sleeps)."""

from __future__ import annotations

from control_plane.controller.retry import BackendRetry


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_backoff_grows_and_the_budget_is_bounded_by_attempts() -> None:
    clock = Clock()
    r = BackendRetry(attempts=4, max_seconds=1e9, base_delay=1.0, max_delay=3.0, clock=clock)
    assert r.due("w")
    assert r.failed("w", "503") is None and not r.due("w")
    clock.t += 1.0  # the first delay is at most base_delay
    assert r.due("w")
    assert r.failed("w", "503") is None and r.attempts_of("w") == 2
    clock.t += 0.99
    assert not r.due("w")  # the 2nd delay (2 s, jittered to [1, 2]) has not passed
    clock.t += 1.01
    assert r.due("w")
    assert r.failed("w", "503") is None
    clock.t += 1.49
    assert not r.due("w")  # 4 s capped at max_delay 3 s, jittered to [1.5, 3]
    clock.t += 1.51  # capped at max_delay
    assert r.due("w")
    reason = r.failed("w", RuntimeError("503 Service Unavailable"))
    assert reason is not None and reason.startswith("gave up after 4 attempts over 6s") and "503 Service" in reason
    assert r.attempts_of("w") == 0 and r.due("w")  # forgotten: a later failure starts afresh


def test_the_budget_is_bounded_by_time_and_success_resets_it() -> None:
    clock = Clock()
    r = BackendRetry(attempts=100, max_seconds=10.0, base_delay=0.0, max_delay=0.0, clock=clock)
    assert r.failed("w", "timeout") is None
    clock.t += 9.0
    assert r.failed("w", "timeout") is None
    r.succeeded("w")
    assert r.attempts_of("w") == 0
    assert r.failed("w", "timeout") is None  # counting starts again
    clock.t += 10.0
    assert r.failed("w", "still timing out") == "gave up after 2 attempts over 10s: still timing out"
    assert r.failed("other", "x") is None  # per workload
