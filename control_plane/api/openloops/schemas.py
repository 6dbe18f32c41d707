"""Request bodies of the ``/v1/openloops`` routes."""

from __future__ import annotations

from typing import Annotated

import msgspec


class CreateApiKeyBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    # a subset of the caller's own scopes (default: the caller's training scopes)
    scopes: list[str] | None = None
