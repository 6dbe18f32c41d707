"""A process's peak resident set from /proc (Linux), for the benchmarks: light enough to import
in a process whose own memory is being measured."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a process (its peak resident set since start or :func:`reset_peak_rss`), from
    /proc; None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM start again from the current resident set (``clear_refs`` 5, Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
