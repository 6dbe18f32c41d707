"""The ObjectStore contract, run against LocalDirStore, S3Store@moto and S3Store@SeaweedFS."""

from __future__ import annotations

import os
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from data_plane.storage import LocalDirStore, ObjectNotFound, ObjectStore, StoreError

MIB = 1 << 20


def test_satisfies_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_put_get_bytes_roundtrip_and_overwrite(store: ObjectStore) -> None:
    payload = bytes(range(256)) * 10
    store.put_bytes("run:1/weights/step-1/adapter.bin", payload)
    assert store.get_bytes("run:1/weights/step-1/adapter.bin") == payload
    store.put_bytes("run:1/weights/step-1/adapter.bin", b"v2")
    assert store.get_bytes("run:1/weights/step-1/adapter.bin") == b"v2"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_put_file_download_file_multipart(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(12 * MIB)
    src.write_bytes(data)
    store.put_file("ckpt/big.bin", src)
    dest = tmp_path / "out" / "nested" / "big.bin"  # parents are created
    store.download_file("ckpt/big.bin", dest)
    assert dest.stat().st_size == len(data)
    assert dest.read_bytes() == data
    [info] = store.list("ckpt/")
    assert (info.key, info.size_bytes) == ("ckpt/big.bin", len(data))


def test_download_file_overwrites_existing(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("k", b"new")
    dest = tmp_path / "k"
    dest.write_bytes(b"old content that is longer")
    store.download_file("k", dest)
    assert dest.read_bytes() == b"new"


def test_exists(store: ObjectStore) -> None:
    assert not store.exists("a/b")
    store.put_bytes("a/b", b"x")
    assert store.exists("a/b")
    assert not store.exists("a")  # a "directory" is not an object
    assert not store.exists("a/b/c")


def test_list_sorted_recursive_with_sizes(store: ObjectStore) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    keys = ["b/z", "a/b/c/d", "a/a", "ab", "a/b/x", "c"]
    for i, key in enumerate(keys):
        store.put_bytes(key, b"x" * i)
    infos = store.list("")
    assert [i.key for i in infos] == sorted(keys)
    assert {i.key: i.size_bytes for i in infos} == {k: n for n, k in enumerate(keys)}
    for info in infos:
        assert info.last_modified.tzinfo is not None
        assert before < info.last_modified < datetime.now(UTC) + timedelta(minutes=5)
    assert [i.key for i in store.list("a/")] == ["a/a", "a/b/c/d", "a/b/x"]
    assert [i.key for i in store.list("a/b/")] == ["a/b/c/d", "a/b/x"]
    # a prefix is a plain string prefix, as in S3: "a" also matches "ab"
    assert [i.key for i in store.list("a")] == ["a/a", "a/b/c/d", "a/b/x", "ab"]
    assert [i.key for i in store.list("a/b/c/d")] == ["a/b/c/d"]
    assert store.list("nothing/") == []


def test_delete_prefix_counts_and_spares_others(store: ObjectStore) -> None:
    for key in ["run1/w/a", "run1/w/b", "run1/s/c", "run10/w/a", "other"]:
        store.put_bytes(key, b"1")
    assert store.delete_prefix("run1/w/") == 2
    assert [i.key for i in store.list("")] == ["other", "run1/s/c", "run10/w/a"]
    assert store.delete_prefix("run1/") == 1
    assert store.delete_prefix("run1/") == 0
    assert store.delete_prefix("missing/") == 0
    assert [i.key for i in store.list("")] == ["other", "run10/w/a"]
    assert store.get_bytes("run10/w/a") == b"1"


def test_missing_key_raises_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound) as info:
        store.get_bytes("no/such/key")
    assert info.value.key == "no/such/key"
    assert isinstance(info.value, StoreError)
    dest = tmp_path / "downloads" / "never.bin"
    with pytest.raises(ObjectNotFound):
        store.download_file("no/such/key", dest)
    assert not dest.exists()
    assert list(dest.parent.glob("*")) == []  # no temp file left behind


def test_presigned_get_url(store: ObjectStore) -> None:
    store.put_bytes("ckpt/adapter.safetensors", b"weights!")
    url = store.presigned_get_url("ckpt/adapter.safetensors", 300)
    if isinstance(store, LocalDirStore):
        assert url is None
        return
    assert url is not None and url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"weights!"


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/abs", "a//b", "a/./b", "", "a/", ".", "a\\b"])
def test_bad_keys_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="invalid object key"):
        store.get_bytes(key)
    with pytest.raises(StoreError, match="invalid object key"):
        store.exists(key)


def test_bad_prefix_rejected(store: ObjectStore) -> None:
    with pytest.raises(StoreError):
        store.list("../")
    with pytest.raises(StoreError):
        store.delete_prefix("/")
