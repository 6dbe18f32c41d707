"""open_store(StoreSpec), and keeping boto3 out of everything but data_plane/storage/s3.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from data_plane.storage import LocalDirStore, S3Store, open_store
from data_plane.wire.worker_config import StoreSpec, TrainerLaunch
from tests.infra.s3_servers import S3Server

REPO = Path(__file__).resolve().parents[2]


def test_local_spec(tmp_path: Path) -> None:
    store = open_store(StoreSpec(kind="local", root=str(tmp_path)))
    assert isinstance(store, LocalDirStore)
    store.put_bytes("k", b"v")
    assert (tmp_path / "k").read_bytes() == b"v"


def test_local_spec_with_prefix(tmp_path: Path) -> None:
    store = open_store(StoreSpec(kind="local", root=str(tmp_path), prefix="ckpts/"))
    store.put_bytes("k", b"v")
    assert (tmp_path / "ckpts" / "k").read_bytes() == b"v"


def test_s3_spec_uses_environment_credentials(moto_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    bucket = moto_s3.new_bucket()
    S3Store(bucket, create_bucket=True, **moto_s3.store_kwargs())
    spec = StoreSpec(kind="s3", bucket=bucket, endpoint_url=moto_s3.endpoint_url, region="us-east-1", prefix="p")
    # the spec survives the worker-config round trip through the environment
    launch = TrainerLaunch("dep-1", "base", "/models/base", "redis://x", store=spec)
    store = open_store(TrainerLaunch.from_env(launch.to_env()).store)
    assert isinstance(store, S3Store)
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"
    url = store.presigned_get_url("k", 60)
    assert f"/{bucket}/p/k?" in url and "X-Amz-Credential=from-env%2F" in url


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StoreSpec(kind="gcs", bucket="b"), "unknown store kind 'gcs'"),
        (StoreSpec(kind="local"), "needs 'root'"),
        (StoreSpec(kind="s3"), "needs 'bucket'"),
    ],
)
def test_bad_specs(spec: StoreSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(spec)


def test_local_store_does_not_import_boto3(tmp_path: Path) -> None:
    code = (
        "import sys; from data_plane.storage import open_store; from data_plane.wire.worker_config import StoreSpec;"
        f"open_store(StoreSpec(kind='local', root={str(tmp_path)!r})).put_bytes('k', b'v');"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_s3_module_imports_boto3() -> None:
    allowed = REPO / "data_plane" / "storage" / "s3.py"
    offenders = [
        str(path.relative_to(REPO))
        for package in ("control_plane", "data_plane")
        for path in (REPO / package).rglob("*.py")
        if path != allowed and _imports(path) & {"boto3", "botocore"}
    ]
    assert offenders == []
    assert {"boto3", "botocore"} <= _imports(allowed)
