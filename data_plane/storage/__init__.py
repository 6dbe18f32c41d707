"""Object storage for checkpoints: a local directory or an S3-compatible bucket.

``S3Store`` (and with it boto3) is imported only on first use, so a worker on a local
directory never pays for boto3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from data_plane.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, StoreError
from data_plane.storage.factory import open_store
from data_plane.storage.local import LocalDirStore

if TYPE_CHECKING:
    from data_plane.storage.s3 import S3Store

__all__ = ["LocalDirStore", "ObjectInfo", "ObjectNotFound", "ObjectStore", "S3Store", "StoreError", "open_store"]


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from data_plane.storage.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
