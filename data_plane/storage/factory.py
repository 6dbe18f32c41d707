"""Open the object store a ``StoreSpec`` describes."""

from __future__ import annotations

from pathlib import Path

from data_plane.storage.base import ObjectStore
from data_plane.wire.worker_config import StoreSpec

KINDS = ("local", "s3")


def open_store(spec: StoreSpec) -> ObjectStore:
    """``local``: a ``LocalDirStore`` at ``root`` (``/prefix`` appended when set).
    ``s3``: an ``S3Store`` for ``bucket``/``endpoint_url``/``region``/``prefix``; credentials
    come from the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or boto3's
    other sources), never from the spec. boto3 is imported only for ``s3``."""
    if spec.kind == "local":
        if not spec.root:
            raise ValueError("store kind 'local' needs 'root' (a directory path)")
        from data_plane.storage.local import LocalDirStore, validate_key

        root = Path(spec.root)
        prefix = spec.prefix.strip("/")
        if prefix:
            root = root.joinpath(*validate_key(prefix))
        return LocalDirStore(root)
    if spec.kind == "s3":
        if not spec.bucket:
            raise ValueError("store kind 's3' needs 'bucket'")
        from data_plane.storage.s3 import S3Store

        return S3Store(
            spec.bucket, endpoint_url=spec.endpoint_url or None, region=spec.region or None, prefix=spec.prefix
        )
    raise ValueError(f"unknown store kind {spec.kind!r}: expected one of {', '.join(KINDS)}")
