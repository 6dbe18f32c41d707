"""How trainer processes allocate host memory: jemalloc, preloaded, unless the settings say
``system`` (``OPENLOOPS_TRAINER_ALLOCATOR``).

Measured on the bench model (bench/README.md, "Trainer memory"): the C library's allocator keeps
the freed activation buffers of a step scattered in its heap, so a worker's peak RSS is far above
what it holds at once; jemalloc, configured never to hand pages back (``dirty_decay_ms:-1``: a
trainer reaches its peak again every step, and handing pages back costs page faults), reuses
them. That lowers the peak and the step time together. Trainer images install it
(docker/trainer.Dockerfile); locally, scripts/install does, and without it a trainer runs on the
system allocator (with a warning).
"""

from __future__ import annotations

import ctypes.util
import functools

import structlog

from control_plane.settings import BackendKind

log = structlog.get_logger(__name__)

JEMALLOC_SONAME = "libjemalloc.so.2"  # what the trainer image's libjemalloc2 package installs
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


@functools.cache
def _local_jemalloc() -> str | None:
    name = ctypes.util.find_library("jemalloc")
    if name is None:
        log.warning(
            "jemalloc not found: trainers use the system allocator (higher peak memory); install it "
            "(apt-get install libjemalloc2, or scripts/install) or set OPENLOOPS_TRAINER_ALLOCATOR=system"
        )
    return name


def trainer_allocator_env(allocator: str, backend: BackendKind) -> dict[str, str]:
    """Environment variables that make a trainer process allocate with ``allocator``."""
    if allocator == "system":
        return {}
    name = JEMALLOC_SONAME if backend == BackendKind.KUBERNETES else _local_jemalloc()
    if name is None:
        return {}
    return {"LD_PRELOAD": name, "MALLOC_CONF": JEMALLOC_CONF}
