"""The one interface between the controller and whatever runs workloads.

A backend is told the *desired* state of each workload (``ensure`` / ``remove`` /
``scale``) and reports what it *observes* (``observe``). It never writes to Postgres: the
controller turns observations into status transitions (with history rows).

Errors: a backend raises :class:`BackendError` subclasses; :class:`TransientBackendError`
means "try again later" (the controller retries with backoff), any other error is permanent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable


class BackendError(RuntimeError):
    """A backend could not carry out a request. Permanent unless it is a
    :class:`TransientBackendError`: retrying the same request will fail the same way (an
    invalid spec, a missing permission, a rejected manifest)."""


class TransientBackendError(BackendError):
    """The request may succeed later (the API server is unreachable, overloaded or timing
    out). The controller retries these with backoff and fails the resource only after a
    bounded number of attempts or time."""


class WorkloadRole(StrEnum):
    TRAINER = "trainer"
    SAMPLER = "sampler"
    SERVED_MODEL = "served-model"  # a served model's own vLLM server (checkpoints as OpenAI models)


class Capacity(StrEnum):
    """Which nodes a workload may run on. SPOT: preemptible capacity (cheaper; a node can be
    taken away at any time), where the backend supports it (``KubernetesSettings.spot_*``)."""

    DEDICATED = "dedicated"
    SPOT = "spot"


class Phase(StrEnum):
    """What a backend can observe about one workload."""

    PENDING = "pending"  # accepted, not started (scheduling, pulling images, process spawning)
    STARTING = "starting"  # running, not ready yet (loading the model)
    READY = "ready"  # serving
    UNHEALTHY = "unhealthy"  # running but failing health checks
    FAILED = "failed"  # exited / crashed / cannot be scheduled; ``reason`` says why
    SCALED_DOWN = "scaled_down"  # desired replicas 0 and nothing running
    ABSENT = "absent"  # nothing exists for this workload


@dataclass(frozen=True, slots=True)
class Resources:
    gpus: int = 0
    gpu_type: str | None = None
    cpu: str | None = None  # Kubernetes quantity, e.g. "4"
    memory: str | None = None  # e.g. "32Gi"
    shm: str | None = None  # shared memory for vLLM, e.g. "8Gi"


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Desired state of one workload, built from rows and the model catalog."""

    workload_id: str  # deployment id (trainer), shared sampler id or served model id
    role: WorkloadRole
    org_id: str
    session_id: str | None
    base_model: str
    # how to start it: a module run with python (local) / the container args (Kubernetes)
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # names of environment variables whose values are secrets (taken from the backend's
    # secret source: the process environment locally, a Secret reference on Kubernetes)
    secret_env: list[str] = field(default_factory=list)
    # a Secret of the workload's own holding HF_TOKEN (a served model's hf_secret_name: a gated
    # base model on Kubernetes; locally HF_TOKEN comes from the server's environment)
    hf_secret: str | None = None
    port: int | None = None  # serves HTTP on this port (samplers, served models)
    health_path: str | None = None
    resources: Resources = field(default_factory=Resources)
    replicas: int = 1
    # pods of one group that start, run and restart together (a multi-node trainer: torchrun
    # across them). > 1: a LeaderWorkerSet on Kubernetes (the leader is pod 0); the local
    # backend runs single-node workloads only
    nodes: int = 1
    capacity: Capacity = Capacity.DEDICATED  # a trainer of a spot deployment: Capacity.SPOT


@dataclass(frozen=True, slots=True)
class Observation:
    workload_id: str
    role: WorkloadRole
    phase: Phase
    reason: str | None = None  # human-readable, e.g. "OOMKilled (exit code 137)"
    endpoint: str | None = None  # base URL where it serves, when it does
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEvent:
    """Something that happened to a workload (a Kubernetes event, a log line locally)."""

    message: str
    reason: str | None = None
    type: str | None = None  # Normal | Warning (Kubernetes)
    object: str | None = None  # e.g. "Pod/openloops-sampler-x-abc"
    time: str | None = None  # ISO 8601
    count: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadDescription:
    """What an operator needs to see about one workload (``openloops admin ... show``)."""

    observation: Observation
    # backend-specific facts: object names (deployment, service, pods), pid, log file, ...
    details: dict[str, Any] = field(default_factory=dict)
    events: list[WorkloadEvent] = field(default_factory=list)  # oldest first


LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # lowest first


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of a workload's own output (``logs``). A line that is not a log record of its
    own (a traceback line, print output) carries the time and level of the record before it."""

    timestamp_ns: int  # Unix epoch, nanoseconds
    message: str
    replica: str  # the pod name on Kubernetes; the log file name locally
    level: str  # one of LOG_LEVELS
    request_id: str | None = None  # from ``request_id=<id>`` or ``(request <id>)`` in the line


@dataclass(frozen=True, slots=True)
class LogQuery:
    """Which lines ``logs`` returns: those with ``start_ns <= timestamp_ns <= end_ns`` and a
    level at least ``min_level``; ``asc``: the oldest ``limit`` of them, oldest first; ``desc``:
    the newest ``limit``, newest first. Raises ``ValueError`` for an invalid limit, direction
    or level (``min_level`` is case-insensitive; ``WARN`` means ``WARNING``)."""

    start_ns: int
    end_ns: int
    limit: int  # 1..1000
    direction: str  # "asc" | "desc"
    min_level: str = "DEBUG"

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= 1000:
            raise ValueError(f"limit must be an integer in 1..1000, got {self.limit!r}")
        if self.direction not in ("asc", "desc"):
            raise ValueError(f"direction must be 'asc' or 'desc', got {self.direction!r}")
        level = str(self.min_level).upper()
        level = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(level, level)
        if level not in LOG_LEVELS:
            raise ValueError(f"min_level must be one of {', '.join(LOG_LEVELS)}, got {self.min_level!r}")
        object.__setattr__(self, "min_level", level)


@dataclass(frozen=True, slots=True)
class UsageSample:
    """Resource usage of one running replica (a pod, or the local process tree)."""

    replica: str  # the pod name on Kubernetes; ``local-<pid>`` locally
    node: str | None  # the node (Kubernetes) or host name (local)
    cpu_cores: float | None  # cores in use, e.g. 1.5; None when the platform gives no metrics
    memory_bytes: int | None  # resident memory
    ephemeral_bytes: int | None  # disk the workload wrote (None where it is not measured)
    ephemeral_capacity_bytes: int | None = None  # what it may write, when known


@runtime_checkable
class SchedulerBackend(Protocol):
    name: str
    # True when every workload runs in its own container (pods): its own network address (a
    # fixed serving port is fine) and filesystem. False when workloads share the host (local
    # processes): each needs its own port and directories.
    isolated_workloads: bool

    async def ensure(self, spec: WorkloadSpec) -> None:
        """Create the workload if it does not exist (idempotent)."""
        ...

    async def remove(self, workload_id: str, role: WorkloadRole) -> None:
        """Stop and delete the workload and everything it owns (idempotent)."""
        ...

    async def scale(self, workload_id: str, role: WorkloadRole, replicas: int) -> None:
        """Scale to ``replicas`` (0 = scaled to zero, keeping its definition)."""
        ...

    async def observe(self, workload_id: str, role: WorkloadRole) -> Observation: ...

    async def list_workloads(self) -> list[tuple[str, WorkloadRole]]:
        """Every workload this backend manages (for garbage collection)."""
        ...

    async def describe(self, workload_id: str, role: WorkloadRole, *, max_events: int = 20) -> WorkloadDescription:
        """Observation plus details and recent events, for operators. Works from a process
        other than the one that started the workload (the admin CLI)."""
        ...

    async def logs(self, workload_id: str, role: WorkloadRole, query: LogQuery) -> list[LogLine]:
        """The workload's own output lines matching ``query`` (every replica, merged in time
        order). Works from another process (like ``describe``); an unknown workload has no
        lines ([]). Raises :class:`TransientBackendError` only when the platform is unreachable."""
        ...

    async def usage(self, workload_id: str, role: WorkloadRole) -> list[UsageSample]:
        """One sample per running replica; [] when nothing runs (or the workload is unknown).
        Works from another process; raises :class:`TransientBackendError` only when the
        platform is unreachable."""
        ...

    async def close(self) -> None: ...
