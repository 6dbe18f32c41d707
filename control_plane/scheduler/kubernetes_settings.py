"""Kubernetes backend configuration (nested under ``Settings.kubernetes``).

Every field can be set from the environment, e.g. ``OPENLOOPS_KUBERNETES__NAMESPACE``; lists
and dicts as JSON (``OPENLOOPS_KUBERNETES__TOLERATIONS='[{"key": "nvidia.com/gpu", ...}]'``).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class KubernetesSettings(BaseModel):
    namespace: str = "openloops-workloads"
    trainer_image: str = "openloops/trainer:latest"
    sampler_image: str = "openloops/sampler:latest"  # samplers and deployments
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, object]] = Field(default_factory=list)
    # added for workloads on spot capacity (WorkloadSpec.capacity), merged with the two above
    # (a spot selector key overrides the same key of node_selector); with neither set, a spot
    # workload is placed like a dedicated one
    spot_node_selector: dict[str, str] = Field(default_factory=dict)
    spot_tolerations: list[dict[str, object]] = Field(default_factory=list)
    priority_class_name: str | None = None
    service_account_name: str | None = None
    # Secret holding worker credentials (S3 keys, Redis password); referenced, never copied.
    # A ``WorkloadSpec.secret_env`` name N becomes ``valueFrom.secretKeyRef {name: this, key: N}``.
    worker_secret_name: str | None = None
    in_cluster: bool = True
    kubeconfig: str | None = None
    api_url: str | None = None  # explicit API server URL (tests)

    # --- workload shape -------------------------------------------------------------------
    cluster_domain: str = "cluster.local"  # endpoints: http://{svc}.{ns}.svc.{cluster_domain}:{port}
    gpu_resource_name: str = "nvidia.com/gpu"
    # node label that carries the GPU model (Resources.gpu_type); NVIDIA GPU feature discovery
    gpu_type_label: str = "nvidia.com/gpu.product"
    # add a NoSchedule toleration for the ``gpu_resource_name`` taint to GPU workloads
    tolerate_gpu_taint: bool = True
    # how long an HTTP workload may take to pass its first health check (model loading)
    startup_timeout_seconds: int = Field(1800, ge=10)
    termination_grace_period_seconds: int = Field(60, ge=0)  # samplers and served models
    # trainers: on SIGTERM (a spot node reclaimed, a removal) a trainer finishes its current op
    # before it exits
    trainer_termination_grace_period_seconds: int = Field(120, ge=0)
    # a pod that cannot be scheduled for this long is reported FAILED (before: PENDING, since a
    # cluster autoscaler may still add a node)
    unschedulable_grace_seconds: float = Field(300.0, ge=0)

    # --- API client behaviour -------------------------------------------------------------
    resync_seconds: float = Field(300.0, gt=0)  # full relist of the watch caches
    watch_timeout_seconds: int = Field(240, ge=1)  # server-side timeout of one watch request
    api_timeout_seconds: float = Field(30.0, gt=0)  # per request
    api_retry_attempts: int = Field(6, ge=1)
    api_retry_base_delay_seconds: float = Field(0.25, ge=0)
    api_retry_max_delay_seconds: float = Field(8.0, ge=0)

    @property
    def spot_configured(self) -> bool:
        """Whether spot workloads are placed differently from dedicated ones."""
        return bool(self.spot_node_selector or self.spot_tolerations)
