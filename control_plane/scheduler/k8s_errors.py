"""Errors raised by the Kubernetes backend.

Callers never see ``kubernetes.client.exceptions.ApiException`` or urllib3 errors: the backend
translates them into these. None of them import the ``kubernetes`` package.
"""

from __future__ import annotations

from control_plane.scheduler.protocol import BackendError, TransientBackendError


class KubernetesBackendError(BackendError):
    """Base class of everything the Kubernetes backend raises."""

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status  # HTTP status from the API server, when there was one
        self.reason = reason  # the API server's reason (``Forbidden``, ``Invalid``, ...)


class KubernetesConfigError(KubernetesBackendError):
    """The client could not be configured (no in-cluster service account, bad kubeconfig)."""


class WorkloadSpecError(KubernetesBackendError, ValueError):
    """A ``WorkloadSpec`` cannot be turned into manifests with the current settings."""


class KubernetesApiError(KubernetesBackendError):
    """The API server rejected a request (4xx other than the expected 404/409)."""


class KubernetesPermissionError(KubernetesApiError):
    """401/403: the control plane's service account lacks a permission (check the Role)."""


class KubernetesUnavailableError(KubernetesBackendError, TransientBackendError):
    """The API server could not be reached or kept failing (5xx, 429, connection errors)
    after the retry budget was spent."""


class WorkloadNotFoundError(KubernetesApiError):
    """The workload's Deployment does not exist (e.g. ``scale`` before ``ensure``)."""
