"""Response bodies of the ``/v1/openloops`` routes."""

from __future__ import annotations

from datetime import datetime

import msgspec


class WhoAmI(msgspec.Struct):
    org_id: str
    org_name: str
    principal_id: str  # the key's user or service account
    principal_name: str  # its email or name
    key_id: str | None
    scopes: list[str]


class ApiKeyOut(msgspec.Struct):
    id: str
    name: str | None
    prefix: str  # the key's first characters, shown to tell keys apart
    owner: str  # email of its user, or name of its service account
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyList(msgspec.Struct):
    keys: list[ApiKeyOut]


class ApiKeyCreated(msgspec.Struct):
    key: ApiKeyOut
    api_key: str  # the secret itself: shown once, never stored


class StatusChange(msgspec.Struct):
    resource_type: str  # run | deployment
    resource_id: str
    from_status: str | None
    to_status: str
    reason: str | None
    at: datetime


class RunActivity(msgspec.Struct):
    id: str
    name: str
    origin: str  # loops | tinker
    base_model: str
    status: str
    status_reason: str | None
    created_by: str
    created_at: datetime
    last_request_at: datetime | None
    policy_version: int
    deployment_id: str | None


class RunActivityList(msgspec.Struct):
    runs: list[RunActivity]
    next_cursor: str | None


class RunHistory(msgspec.Struct):
    run_id: str
    changes: list[StatusChange]  # the run's and its deployment's, oldest first
