"""The object-store interface shared by the control plane and the workers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    """Base class of object-store failures (never a boto3/OS exception type)."""


class ObjectNotFound(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key}")
        self.key = key


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size_bytes: int
    last_modified: datetime


@runtime_checkable
class ObjectStore(Protocol):
    """Keys are ``/``-separated strings relative to the store's configured prefix.

    A key is relative, with no empty, ``.`` or ``..`` segment (``StoreError`` otherwise), so
    the same keys work on every store. A ``prefix`` is a plain string prefix of keys, as in
    S3: ``"a/b/"`` selects the "directory" ``a/b``, while ``"a/b"`` also selects ``a/bc``.
    Missing objects raise ``ObjectNotFound``; every other failure raises ``StoreError``.
    """

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def download_file(self, key: str, path: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix`` (recursively), sorted by key."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""
        ...

    def presigned_get_url(self, key: str, expires_in_s: int) -> str | None:
        """A URL anyone can GET until it expires, or None when the store cannot sign
        (the local directory store: the API serves and signs those downloads itself)."""
        ...
