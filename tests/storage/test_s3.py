"""S3Store specifics: pagination, batched deletes, multipart, prefixes, error translation."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from control_plane.scheduler.ports import free_ports
from data_plane.storage import ObjectNotFound, S3Store, StoreError
from data_plane.storage import s3 as s3_module
from tests.infra.s3_servers import S3Server, seed_moto_objects

MIB = 1 << 20


def assert_ours(exc: BaseException) -> None:
    """The exception type (and its bases) come from our code, not boto3/botocore."""
    modules = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    assert not modules & {"boto3", "botocore", "s3transfer"}, type(exc).__mro__


def test_list_and_delete_more_than_1000_objects(moto_s3: S3Server) -> None:
    store = moto_s3.new_store()
    keys = [f"many/{i:05d}" for i in range(2345)]
    seed_moto_objects(store.bucket, {k: k.encode() for k in keys[5:]})
    for key in keys[:5]:  # a few through the API, to prove seeded and PUT objects mix
        store.put_bytes(key, key.encode())
    store.put_bytes("keep/me", b"1")
    started = time.monotonic()
    infos = store.list("many/")
    assert [i.key for i in infos] == keys  # three ListObjectsV2 pages, in order
    assert all(i.size_bytes == len("many/00000") for i in infos)
    assert len(store.list("")) == 2346
    assert store.delete_prefix("many/") == 2345  # three DeleteObjects batches
    assert [i.key for i in store.list("")] == ["keep/me"]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("server_fixture", ["moto_s3", "seaweed_s3"])
def test_put_file_is_multipart(request: pytest.FixtureRequest, server_fixture: str, tmp_path: Path) -> None:
    store = request.getfixturevalue(server_fixture).new_store()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MIB))
    store.put_file("big.bin", src)
    url = store.presigned_get_url("big.bin", 60)
    with urllib.request.urlopen(url, timeout=30) as resp:
        etag = resp.headers["ETag"]
        body = resp.read()
    assert body == src.read_bytes()
    assert etag.strip('"').endswith("-2"), etag  # 8 MiB + 4 MiB parts


def test_store_prefix_isolates_keys(moto_s3: S3Server) -> None:
    bucket = moto_s3.new_bucket()
    a = S3Store(bucket, prefix="tenant-a/", create_bucket=True, **moto_s3.store_kwargs())
    b = S3Store(bucket, prefix="/tenant-b", **moto_s3.store_kwargs())
    root = S3Store(bucket, **moto_s3.store_kwargs())
    a.put_bytes("ckpt/x", b"a")
    b.put_bytes("ckpt/x", b"b")
    assert a.get_bytes("ckpt/x") == b"a" and b.get_bytes("ckpt/x") == b"b"
    assert [i.key for i in a.list("")] == ["ckpt/x"]
    assert [i.key for i in root.list("")] == ["tenant-a/ckpt/x", "tenant-b/ckpt/x"]
    assert a.delete_prefix("") == 1
    assert [i.key for i in root.list("")] == ["tenant-b/ckpt/x"]
    assert "tenant-b/ckpt/x" in b.presigned_get_url("ckpt/x", 60)


def test_wrong_credentials_raise_store_error(seaweed_s3: S3Server, tmp_path: Path) -> None:
    good = seaweed_s3.new_store()
    good.put_bytes("k", b"v")
    bad = S3Store(
        good.bucket,
        endpoint_url=seaweed_s3.endpoint_url,
        region=seaweed_s3.region,
        access_key_id=seaweed_s3.access_key_id,
        secret_access_key="not-the-secret",
    )
    src = tmp_path / "f"
    src.write_bytes(b"data")
    calls = {
        "put_bytes": lambda: bad.put_bytes("k2", b"v"),
        "put_file": lambda: bad.put_file("k2", src),
        "get_bytes": lambda: bad.get_bytes("k"),
        "download_file": lambda: bad.download_file("k", tmp_path / "out"),
        "exists": lambda: bad.exists("k"),
        "list": lambda: bad.list(""),
        "delete_prefix": lambda: bad.delete_prefix(""),
    }
    for name, call in calls.items():
        with pytest.raises(StoreError) as info:
            call()
        assert not isinstance(info.value, ObjectNotFound), name
        assert_ours(info.value)
        assert "access denied" in str(info.value) and good.bucket in str(info.value), (name, str(info.value))
    assert good.get_bytes("k") == b"v" and not good.exists("k2")
    # unknown access key too, and when creating the bucket
    with pytest.raises(StoreError, match="access denied"):
        S3Store(
            seaweed_s3.new_bucket(),
            create_bucket=True,
            endpoint_url=seaweed_s3.endpoint_url,
            access_key_id="nobody",
            secret_access_key="nothing",
        )
    # a presigned URL signed with the wrong secret is refused by the server
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(bad.presigned_get_url("k", 60), timeout=10)
    assert http.value.code == 403


def test_missing_bucket_is_store_error(moto_s3: S3Server) -> None:
    store = S3Store(moto_s3.new_bucket(), **moto_s3.store_kwargs())
    for call in (lambda: store.put_bytes("k", b"v"), lambda: store.get_bytes("k"), lambda: store.list("")):
        with pytest.raises(StoreError, match="does not exist") as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)
        assert store.bucket in str(info.value)


def test_no_credentials_is_store_error(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store("any-bucket", endpoint_url=moto_s3.endpoint_url, region="us-east-1")
    with pytest.raises(StoreError, match="no usable credentials") as info:
        store.get_bytes("k")
    assert_ours(info.value)


def test_credentials_come_from_environment(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    store = S3Store(moto_s3.new_bucket(), endpoint_url=moto_s3.endpoint_url, region="us-east-1", create_bucket=True)
    store.put_bytes("k", b"v")
    assert "X-Amz-Credential=env-key%2F" in store.presigned_get_url("k", 60)


def test_unreachable_endpoint_is_store_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_module, "MAX_ATTEMPTS", 1)  # no retry backoff: keep the test fast
    port = free_ports(1)[0]  # nothing listens there
    store = S3Store(
        "bucket", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", access_key_id="a", secret_access_key="b"
    )
    with pytest.raises(StoreError, match="127.0.0.1") as info:
        store.exists("k")
    assert_ours(info.value)


def test_presign_expiry_bounds(moto_s3: S3Server) -> None:
    store = moto_s3.new_store()
    with pytest.raises(ValueError):
        store.presigned_get_url("k", 0)
    with pytest.raises(ValueError):
        store.presigned_get_url("k", 8 * 24 * 3600)


@pytest.mark.parametrize("server_fixture", ["moto_s3", "seaweed_s3"])
def test_empty_object_does_not_stall_next_request(request: pytest.FixtureRequest, server_fixture: str) -> None:
    # SeaweedFS stalled the request after an empty PutObject sent with "Expect: 100-continue"
    store = request.getfixturevalue(server_fixture).new_store()
    started = time.monotonic()
    store.put_bytes("empty", b"")
    store.put_bytes("next", b"x")
    assert store.get_bytes("empty") == b"" and store.get_bytes("next") == b"x"
    assert time.monotonic() - started < 5
