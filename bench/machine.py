"""The machine a benchmark ran on: every benchmark prints this line and puts it above its table."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def load_average() -> float:
    """1-minute load average: anything above 0 here was not this benchmark's doing at start."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_line() -> str:
    """CPUs and their model, Python, and how busy the machine was when this was called."""
    return (
        f"{os.cpu_count()} CPUs ({cpu_name()}, {platform.machine()}), Python {platform.python_version()}, "
        f"load average {load_average():.2f}"
    )
