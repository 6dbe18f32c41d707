"""Status vocabularies shared by runs, samplers and deployments (Baseten DeploymentStatusV1)."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    BUILDING = "BUILDING"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    LOADING_MODEL = "LOADING_MODEL"
    ACTIVE = "ACTIVE"
    UNHEALTHY = "UNHEALTHY"
    BUILD_FAILED = "BUILD_FAILED"
    BUILD_STOPPED = "BUILD_STOPPED"
    DEACTIVATING = "DEACTIVATING"
    INACTIVE = "INACTIVE"
    FAILED = "FAILED"
    UPDATING = "UPDATING"
    SCALED_TO_ZERO = "SCALED_TO_ZERO"
    WAKING_UP = "WAKING_UP"


# statuses after which nothing runs and nothing will be started again
TERMINAL = frozenset({Status.INACTIVE, Status.FAILED, Status.DEPLOY_FAILED, Status.BUILD_FAILED})
# statuses in which a workload should exist (the controller keeps it ensured)
LIVE = frozenset(
    {
        Status.DEPLOYING,
        Status.LOADING_MODEL,
        Status.ACTIVE,
        Status.UNHEALTHY,
        Status.UPDATING,
        Status.WAKING_UP,
    }
)


class SessionStatus(StrEnum):
    ACTIVE = "active"
    FINISHED = "finished"
    EXPIRED = "expired"


class Scope(StrEnum):
    MANAGE_ORG_TRAINING_PROJECTS = "manage_org_training_projects"
    MANAGE_OWN = "manage_own_user_or_service_account"
    # the org's API keys (list, create, revoke): an openloops extension, never granted by
    # default (``openloops admin keys create --scope manage_org_api_keys``)
    MANAGE_ORG_API_KEYS = "manage_org_api_keys"


ALL_SCOPES = (Scope.MANAGE_ORG_TRAINING_PROJECTS, Scope.MANAGE_OWN)
