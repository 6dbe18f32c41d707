"""LocalDirStore specifics: root confinement, atomic writes, temp files, empty directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_plane.storage import LocalDirStore, StoreError
from data_plane.storage.local import TEMP_PREFIX


@pytest.fixture
def store(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "root")


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/etc/passwd", "a//b", "", "a/.", ".."])
def test_keys_cannot_escape_root(store: LocalDirStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="invalid object key"):
        store.download_file(key, tmp_path / "dl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert list(store.root.iterdir()) == []


def test_key_maps_to_file_under_root(store: LocalDirStore) -> None:
    store.put_bytes("run:1/weights/000005/adapter.safetensors", b"w")
    assert (store.root / "run:1" / "weights" / "000005" / "adapter.safetensors").read_bytes() == b"w"


def test_failed_write_keeps_old_object_and_leaves_no_temp(
    store: LocalDirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_bytes("a/obj", b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StoreError, match="No space left"):
        store.put_bytes("a/obj", b"new")
    monkeypatch.undo()
    assert store.get_bytes("a/obj") == b"old"
    assert sorted(p.name for p in (store.root / "a").iterdir()) == ["obj"]


def test_temp_files_are_invisible(store: LocalDirStore) -> None:
    store.put_bytes("d/real", b"1")
    (store.root / "d" / f"{TEMP_PREFIX}abc.tmp").write_bytes(b"half-written")
    assert [i.key for i in store.list("")] == ["d/real"]
    assert store.delete_prefix("d/") == 1
    assert (store.root / "d" / f"{TEMP_PREFIX}abc.tmp").exists()  # an in-flight write is left alone
    with pytest.raises(StoreError):
        store.put_bytes(f"d/{TEMP_PREFIX}x", b"1")


def test_delete_prefix_removes_empty_directories(store: LocalDirStore) -> None:
    for key in ["run1/weights/s1/a", "run1/weights/s1/b", "run1/weights/s2/a", "run1/sampler/s1/a", "run10/x"]:
        store.put_bytes(key, b"1")
    assert store.delete_prefix("run1/weights/") == 3
    assert not (store.root / "run1" / "weights").exists()
    assert (store.root / "run1" / "sampler" / "s1" / "a").is_file()
    assert store.delete_prefix("run1") == 2  # string prefix: run1/... and run10/...
    assert list(store.root.iterdir()) == []
    assert store.root.is_dir()
    store.put_bytes("run1/weights/s1/a", b"again")  # directories come back on demand
    assert store.get_bytes("run1/weights/s1/a") == b"again"


def test_file_directory_conflict_is_store_error(store: LocalDirStore) -> None:
    store.put_bytes("a", b"file")
    with pytest.raises(StoreError):
        store.put_bytes("a/b", b"x")
    assert store.get_bytes("a") == b"file"


def test_put_file_missing_source_is_store_error(store: LocalDirStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="source file not found"):
        store.put_file("k", tmp_path / "missing")
    assert not store.exists("k")
