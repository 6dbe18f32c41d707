"""An object store in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...).

This is the only module of the project that imports boto3/botocore: everything else
sees ``ObjectStore`` and our ``StoreError``/``ObjectNotFound``, never a botocore
exception.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from data_plane.storage.base import ObjectInfo, ObjectNotFound, StoreError
from data_plane.storage.local import validate_key, validate_prefix

MIB = 1 << 20
# Files larger than the threshold go up and down in parallel parts of this size.
TRANSFER = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB, max_concurrency=8)
MAX_ATTEMPTS = 5  # per request, "standard" retry mode (throttling, 5xx, connection errors)
DELETE_BATCH = 1000  # the DeleteObjects limit
MAX_PRESIGN_S = 7 * 24 * 3600  # the SigV4 limit

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
}


def _client_error(exc: BaseException) -> ClientError | None:
    """The ClientError behind ``exc`` (boto3 wraps upload failures in S3UploadFailedError)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ClientError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _from_aws_sdk(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in {"boto3", "botocore", "s3transfer"}


def _parse_code_from_text(text: str) -> str | None:
    m = re.search(r"An error occurred \(([^)]+)\)", text)
    return m.group(1) if m else None


def _drop_expect_on_empty_body(request: Any, **_kwargs: Any) -> None:
    """botocore sends ``Expect: 100-continue`` on PutObject even for an empty body; SeaweedFS
    then stalls the next request on that connection until the read timeout (60 s). Nothing
    is gained by waiting for "100 Continue" before sending zero bytes, so drop the header."""
    if "Expect" in request.headers and request.headers.get("Content-Length") in ("0", b"0"):
        del request.headers["Expect"]


class S3Store:
    """``ObjectStore`` over ``bucket``; keys are stored under ``prefix`` (``""`` = bucket root).

    Credentials, when not given, come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, shared config files, IRSA, instance
    metadata). The region, when not given, also comes from that chain (``AWS_REGION``).
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        if not bucket:
            raise StoreError("S3 store needs a bucket name")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        config = Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            # S3-compatible servers do not all accept the CRC checksums botocore >= 1.36
            # sends by default; only send them where the API requires one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session(
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                region_name=region,
            )
            self._s3 = session.client("s3", endpoint_url=endpoint_url, config=config)
        except BotoCoreError as exc:
            raise StoreError(f"cannot configure S3 client for bucket {bucket!r}: {exc}") from exc
        self._s3.meta.events.register("before-send.s3", _drop_expect_on_empty_body)
        if create_bucket:
            self._ensure_bucket()

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store(s3://{self.bucket}/{self.prefix}{where})"

    # -- helpers --------------------------------------------------------------------

    def _key(self, key: str) -> str:
        validate_key(key)
        return self.prefix + key

    def _where(self, key: str | None = None) -> str:
        where = f"s3://{self.bucket}/{self.prefix}{key or ''}"
        return where + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else "")

    @contextmanager
    def _errors(self, op: str, key: str | None = None) -> Iterator[None]:
        """Translate boto3/botocore failures of ``op`` into StoreError/ObjectNotFound."""
        try:
            yield
        except StoreError:
            raise
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(
                f"S3 {op} failed for {self._where(key)}: no usable credentials "
                f"(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {op} failed for {self._where(key)}: {exc}") from exc
        except Exception as exc:
            ce = _client_error(exc)
            if ce is None:
                if not _from_aws_sdk(exc):
                    raise
                code = _parse_code_from_text(str(exc))
                if code is None:
                    raise StoreError(f"S3 {op} failed for {self._where(key)}: {exc}") from exc
                message = str(exc)
            else:
                err = ce.response.get("Error", {})
                code = str(err.get("Code", ""))
                message = err.get("Message") or str(ce)
            if code in _NOT_FOUND and key is not None:
                raise ObjectNotFound(key) from exc
            if code == "NoSuchBucket" or (code in _NOT_FOUND and key is None):
                raise StoreError(f"S3 {op} failed: bucket {self.bucket!r} does not exist ({self._where()})") from exc
            if code in _DENIED:
                raise StoreError(
                    f"S3 {op} failed: access denied to bucket {self.bucket!r} ({code}: {message}); "
                    f"check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the "
                    f"bucket policy for {self._where(key)}"
                ) from exc
            raise StoreError(f"S3 {op} failed for {self._where(key)}: {code}: {message}") from exc

    def _ensure_bucket(self) -> None:
        with self._errors("head_bucket"):
            try:
                self._s3.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
        kwargs: dict = {"Bucket": self.bucket}
        region = self._s3.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        with self._errors("create_bucket"):
            try:
                self._s3.create_bucket(**kwargs)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in {"BucketAlreadyOwnedByYou"}:
                    raise

    # -- ObjectStore ----------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        with self._errors("put", key):
            self._s3.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))

    def put_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"cannot upload {key!r}: source file not found: {path}")
        with self._errors("upload", key):
            self._s3.upload_file(os.fspath(path), self.bucket, full, Config=TRANSFER)

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)
        with self._errors("get", key):
            resp = self._s3.get_object(Bucket=self.bucket, Key=full)
            with resp["Body"] as body:
                return body.read()

    def download_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot download {key!r} to {path}: {exc}") from exc
        # boto3 writes to a temporary name next to ``path`` and renames it when complete.
        with self._errors("download", key):
            try:
                self._s3.download_file(self.bucket, full, os.fspath(path), Config=TRANSFER)
            except OSError as exc:
                if _client_error(exc) is None:
                    raise StoreError(f"cannot download {key!r} to {path}: {exc}") from exc
                raise

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            with self._errors("head", key):
                self._s3.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            return False
        return True

    def _pages(self, prefix: str) -> Iterator[list[dict]]:
        """Pages of raw ``Contents`` entries (ListObjectsV2, following continuation tokens)."""
        full = self.prefix + validate_prefix(prefix)
        kwargs = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": 1000}
        while True:
            with self._errors("list"):
                resp = self._s3.list_objects_v2(**kwargs)
            yield resp.get("Contents", [])
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    def list(self, prefix: str) -> list[ObjectInfo]:
        n = len(self.prefix)
        out = [
            ObjectInfo(obj["Key"][n:], int(obj["Size"]), obj["LastModified"])
            for page in self._pages(prefix)
            for obj in page
            if not obj["Key"].endswith("/")  # "directory marker" objects some tools create
        ]
        out.sort(key=lambda info: info.key)
        return out

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        # Each page (<= 1000 keys) is one DeleteObjects batch; deleting the keys already
        # listed does not disturb the continuation token, which resumes after the last key.
        for page in self._pages(prefix):
            keys = [obj["Key"] for obj in page]
            for i in range(0, len(keys), DELETE_BATCH):
                batch = keys[i : i + DELETE_BATCH]
                with self._errors("delete"):
                    resp = self._s3.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                    )
                errors = resp.get("Errors", [])
                deleted += len(batch) - len(errors)
                if errors:
                    first = errors[0]
                    raise StoreError(
                        f"S3 delete failed for {len(errors)} of {len(batch)} objects under "
                        f"{self._where(prefix)}; first: {first.get('Key')}: {first.get('Code')}: "
                        f"{first.get('Message')}"
                    )
        return deleted

    def presigned_get_url(self, key: str, expires_in_s: int) -> str | None:
        full = self._key(key)
        if not 0 < int(expires_in_s) <= MAX_PRESIGN_S:
            raise ValueError(f"expires_in_s must be in 1..{MAX_PRESIGN_S}, got {expires_in_s}")
        with self._errors("presign", key):
            return self._s3.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": full},
                ExpiresIn=int(expires_in_s),
            )
