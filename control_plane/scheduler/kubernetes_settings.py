"""Kubernetes backend configuration (nested under ``Settings.kubernetes``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class KubernetesSettings(BaseModel):
    namespace: str = "openloops-workloads"
    trainer_image: str = "openloops/trainer:latest"
    sampler_image: str = "openloops/sampler:latest"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, object]] = Field(default_factory=list)
    priority_class_name: str | None = None
    service_account_name: str | None = None
    # Secret holding worker credentials (S3 keys, Redis password); referenced, never copied
    worker_secret_name: str | None = None
    in_cluster: bool = True
    kubeconfig: str | None = None
    api_url: str | None = None  # explicit API server URL (tests)
