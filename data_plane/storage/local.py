"""An object store in a local directory (local mode, tests).

Each key is a file under ``root``; ``/`` in a key is a directory separator. Every write
goes to a temporary file in the destination directory and is then renamed over the
final name, so a reader never sees a half-written object and a crash leaves at most a
stray temporary file, which ``list`` and ``delete_prefix`` ignore.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from data_plane.storage.base import ObjectInfo, ObjectNotFound, StoreError

TEMP_PREFIX = ".olt-"  # temporary files of in-flight writes; no key segment may start so
_COPY_CHUNK = 1 << 20


def validate_key(key: str) -> list[str]:
    """The segments of ``key``; raises StoreError for a key that could escape a root or
    that no store can hold the same way (absolute, empty/``.``/``..`` segments, NUL)."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid object key {key!r}: must be a non-empty string")
    segments = key.split("/")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise StoreError(f"invalid object key {key!r}: it must be relative, with no empty, '.' or '..' segments")
        if "\x00" in seg or "\\" in seg:
            raise StoreError(f"invalid object key {key!r}: NUL and backslash are not allowed")
        if seg.startswith(TEMP_PREFIX):
            raise StoreError(f"invalid object key {key!r}: segments may not start with {TEMP_PREFIX!r}")
    return segments


def validate_prefix(prefix: str) -> str:
    """``prefix`` is a plain string prefix of keys (as in S3): ``""`` means everything,
    ``"a/b/"`` everything in "directory" ``a/b``, and ``"a/b"`` also matches ``a/bc``."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class LocalDirStore:
    """``ObjectStore`` backed by the directory ``root`` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.root}: {exc}") from exc

    def __repr__(self) -> str:
        return f"LocalDirStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key))

    # -- writes ---------------------------------------------------------------------

    def _write_atomic(self, key: str, write: Callable[[int], None]) -> None:
        """Create a temp file next to the target, let ``write(fd)`` fill it, fsync, rename."""
        dest = self._path(key)
        for attempt in range(3):
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=TEMP_PREFIX, suffix=".tmp")
                break
            except FileNotFoundError:
                # a concurrent delete_prefix removed the (empty) parent in between
                if attempt == 2:
                    raise StoreError(f"cannot write {key!r}: its directory keeps disappearing") from None
            except OSError as exc:
                raise StoreError(f"cannot write {key!r} under {self.root}: {exc}") from exc
        try:
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write {key!r} under {self.root}: {exc}") from exc
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        view = memoryview(data)

        def write(fd: int) -> None:
            offset = 0
            while offset < len(view):
                offset += os.write(fd, view[offset:])

        self._write_atomic(key, write)

    def put_file(self, key: str, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"cannot upload {key!r}: source file not found: {path}")

        def write(fd: int) -> None:
            with open(path, "rb") as src, open(fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK)

        self._write_atomic(key, write)

    # -- reads ----------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StoreError(f"cannot read {key!r} under {self.root}: {exc}") from exc

    def download_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(key)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".tmp")
            try:
                with open(fd, "wb") as dst, open(src, "rb") as s:
                    shutil.copyfileobj(s, dst, _COPY_CHUNK)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StoreError(f"cannot download {key!r} to {path}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _walk(self, prefix: str) -> tuple[Path, str]:
        """The directory to walk for ``prefix`` and the key prefix of that directory."""
        head = prefix.rpartition("/")[0]  # "a/b/c" -> "a/b"; "a/b/" -> "a/b"; "abc" -> ""
        return (self.root.joinpath(*head.split("/")) if head else self.root), (f"{head}/" if head else "")

    def _iter_files(self, prefix: str) -> Iterator[tuple[str, Path]]:
        base, base_key = self._walk(validate_prefix(prefix))
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            dir_key = base_key if rel == "." else base_key + rel.replace(os.sep, "/") + "/"
            # prune directories that cannot contain matching keys
            dirnames[:] = [
                d for d in dirnames if (dir_key + d + "/").startswith(prefix) or prefix.startswith(dir_key + d + "/")
            ]
            for name in filenames:
                key = dir_key + name
                if not name.startswith(TEMP_PREFIX) and key.startswith(prefix):
                    yield key, Path(dirpath, name)

    def list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for key, path in self._iter_files(prefix):
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            out.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=UTC)))
        out.sort(key=lambda info: info.key)
        return out

    # -- deletes --------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        for _key, path in list(self._iter_files(prefix)):
            try:
                path.unlink()
                deleted += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot delete {path}: {exc}") from exc
        self._remove_empty_dirs(prefix)
        return deleted

    def _remove_empty_dirs(self, prefix: str) -> None:
        base, base_key = self._walk(prefix)
        for dirpath, _dirnames, _filenames in os.walk(base, topdown=False):
            rel = os.path.relpath(dirpath, base)
            if rel == ".":
                continue  # never the walk base (it is the root or a parent outside the prefix)
            if (base_key + rel.replace(os.sep, "/") + "/").startswith(prefix):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass  # not empty (a temp file of an in-flight write, or a non-matching key)
        if prefix.endswith("/") and base != self.root:
            # "a/b/" walks a/b itself: remove it too once empty
            try:
                os.rmdir(base)
            except OSError:
                pass

    def presigned_get_url(self, key: str, expires_in_s: int) -> str | None:
        validate_key(key)
        return None
