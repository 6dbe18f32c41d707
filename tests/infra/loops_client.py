"""Run the unmodified official Baseten Loops SDK as a client of a live openloops server.

The SDK (``baseten-loops``), its Tinker shim (``baseten-loops-tinker``: a top-level ``tinker``
that re-exports the SDK) and ``tinker-cookbook`` need Python 3.12, so they live in their own
virtualenv, ``.venvs/loops-client``, built by ``scripts/install test``. A test hands this module a
client script; it runs in that venv, configured only through the SDK's environment variables, and
reports back by printing one JSON object as its last line of JSON on stdout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.loops_sdk import VENV, client_env, last_json_object, loops_python

# the venv, its interpreter and a client's environment are the benchmark's too (bench/loops_sdk.py)
REPO_ROOT = Path(__file__).resolve().parents[2]
_STDERR_TAIL = 6000


@dataclass(frozen=True)
class ClientResult:
    returncode: int
    stdout: str
    stderr: str
    result: dict | None  # the last stdout line that is a JSON object


def require_loops_python() -> Path:
    """The venv's interpreter for a test: skips without it, but fails under CI (``CI=true``),
    whose ``scripts/test`` installs it, so that a broken install cannot pass as skipped tests."""
    python = loops_python()
    if python is not None:
        return python
    msg = f"the Loops client venv ({VENV.relative_to(REPO_ROOT)}) is not installed: run `scripts/install test`"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _tail(text: str, limit: int = _STDERR_TAIL) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


class ClientProcess:
    """A client script started by :func:`start_client`, still running: a test can act on the
    server meanwhile (kill a trainer, restart the server) and then :meth:`wait` for it."""

    def __init__(self, proc: subprocess.Popen[str], tmp: tempfile.TemporaryDirectory[str], label: str, name: str):
        self.proc = proc
        self._tmp = tmp
        self._label = label
        self._name = name

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 600) -> ClientResult:
        """The script's result once it exits. A non-zero exit or a timeout raises
        ``AssertionError`` carrying the tail of its stderr."""
        label, name, proc = self._label, self._name, self.proc
        try:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                stdout, stderr = proc.communicate()
                raise AssertionError(
                    f"{label} {name} timed out after {timeout:g} s; stderr tail:\n{_tail(stderr)}"
                    f"\nstdout tail:\n{_tail(stdout, 2000)}"
                ) from None
        finally:
            self._tmp.cleanup()
        if proc.returncode != 0:
            raise AssertionError(
                f"{label} {name} exited with {proc.returncode}; stderr tail:\n{_tail(stderr)}"
                f"\nstdout tail:\n{_tail(stdout, 2000)}"
            )
        return ClientResult(proc.returncode, stdout, stderr, last_json_object(stdout))

    def kill(self) -> None:
        """End the script and its children (it leads its own process group), unless it has
        exited already (then its id may be someone else's)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_client(
    script: str | Path,
    *,
    base_url: str,
    api_key: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    python: Path | None = None,
) -> ClientProcess:
    """Start ``script`` (a ``Path`` is a file, a ``str`` is Python source) in the Loops client
    venv (or with ``python``, another client venv's interpreter: see tests/e2e/test_older_sdks.py)
    and return without waiting for it; see :func:`run_client`."""
    python = python or loops_python()
    if python is None:
        raise AssertionError(f"the Loops client venv {VENV} is not installed: run `scripts/install test`")
    label = "Loops client" if python.parents[1] == VENV else f"client ({python.parents[1].name})"
    tmp = tempfile.TemporaryDirectory(prefix="loops-client-")
    try:
        if isinstance(script, Path):
            path, name = script.resolve(), script.name
        else:
            path, name = Path(tmp.name) / "client_script.py", "<client script>"
            path.write_text(script)
        proc = subprocess.Popen(
            [str(python), str(path)],
            cwd=cwd or tmp.name,
            env=client_env(base_url, api_key, env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so a timeout can end the script's children too
        )
    except BaseException:
        tmp.cleanup()
        raise
    return ClientProcess(proc, tmp, label, name)


def run_client(
    script: str | Path,
    *,
    base_url: str,
    api_key: str,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
    python: Path | None = None,
) -> ClientResult:
    """Run ``script`` (a ``Path`` is a file, a ``str`` is Python source) in the Loops client venv
    (or with ``python``, another client venv's interpreter: see tests/e2e/test_older_sdks.py).

    ``env`` is added on top of the client environment (see ``client_env``); ``cwd`` defaults to a
    fresh temporary directory. A non-zero exit or a timeout raises ``AssertionError`` carrying the
    tail of the script's stderr."""
    client = start_client(script, base_url=base_url, api_key=api_key, env=env, cwd=cwd, python=python)
    return client.wait(timeout)
