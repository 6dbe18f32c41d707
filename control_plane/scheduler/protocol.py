"""The one interface between the controller and whatever runs workloads.

A backend is told the *desired* state of each workload (``ensure`` / ``remove`` /
``scale``) and reports what it *observes* (``observe``). It never writes to Postgres: the
controller turns observations into status transitions (with history rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


class WorkloadRole(StrEnum):
    TRAINER = "trainer"
    SAMPLER = "sampler"
    DEPLOYMENT = "deployment"


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

    workload_id: str  # run id, sampler id or deployment id
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
    port: int | None = None  # serves HTTP on this port (samplers, deployments)
    health_path: str | None = None
    resources: Resources = field(default_factory=Resources)
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class Observation:
    workload_id: str
    role: WorkloadRole
    phase: Phase
    reason: str | None = None  # human-readable, e.g. "OOMKilled (exit code 137)"
    endpoint: str | None = None  # base URL where it serves, when it does
    exit_code: int | None = None


@runtime_checkable
class SchedulerBackend(Protocol):
    name: str

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

    async def close(self) -> None: ...
