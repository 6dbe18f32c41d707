"""What the benchmarks that run ``openloops serve`` share: the server as its own process (API +
controller + local process backend) on a :class:`~bench.stack.Stack`, an API key, the aiohttp
client the load is sent with, a LoRA training step through the tinker SDK, the trainer worker's
process (its pid and peak memory), percentiles, and the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.stack import Stack
from control_plane.scheduler.ports import free_port

REPO = Path(__file__).resolve().parents[1]
# a fixed, pre-tokenized prompt (ids valid in the tiny and bench models' vocabularies)
PROMPT = [17, 240, 31, 99, 512, 7, 1200, 64, 301, 88, 45, 1999, 5, 6, 7, 8]


async def make_key(database_url: str, org_name: str = "bench-sampling") -> str:
    """A new org, user and API key; the key's plaintext."""
    from control_plane.db.engine import Database
    from control_plane.services import identity

    db = Database(database_url)
    try:
        async with db.transaction() as s:
            org = await identity.create_org(s, org_name)
            user = await identity.create_user(s, org, "bench@example.com")
            key = await identity.create_api_key(s, user)
        return key.plaintext
    finally:
        await db.close()


def client_session(base: str, limit: int, **headers: str) -> aiohttp.ClientSession:
    """The load generator's HTTP client. aiohttp for every raw-HTTP path: the client shares the
    cores with vLLM here, and httpx's pool costs ~13 ms of CPU per request at 64 in flight (it
    would measure itself)."""
    return aiohttp.ClientSession(
        base,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=120.0),
        connector=aiohttp.TCPConnector(limit=limit),
    )


@dataclass
class Server:
    """``openloops serve`` in its own process; its output goes to ``log``."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_openloops(stack: Stack, catalog: Path, name: str, **env: str) -> Server:
    """Start ``openloops serve`` for the models of ``catalog`` (quiet: no access log, warnings
    only; the controller ticks every 0.5 s; ``env`` overrides any of these) and wait for
    ``/healthz``."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_env = {
        **os.environ,
        **stack.server_env(
            **{
                "OPENLOOPS_MODEL_CATALOG_PATH": str(catalog),
                "OPENLOOPS_PORT": str(port),
                "OPENLOOPS_PUBLIC_BASE_URL": base,
                "OPENLOOPS_ACCESS_LOG": "false",
                "OPENLOOPS_LOG_LEVEL": "warning",
                "OPENLOOPS_CONTROLLER_INTERVAL_SECONDS": "0.5",
                **env,
            }
        ),
    }
    log = Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane.cli.main", "serve"],
            cwd=REPO,
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, base, log)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"openloops serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"openloops serve did not answer /healthz in 60 s; see {log}")


def prompt_datum(tokens: list[int]) -> Any:
    """A tinker cross-entropy datum: predict each token of ``tokens`` from the ones before."""
    from tinker import types

    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def trainer_pid(redis_url: str, deployment_id: str) -> int | None:
    """The pid a deployment's trainer worker reported last (``worker_state_key``): the live one
    once the worker is ready; None before any worker started."""
    import redis

    from data_plane.wire.queue import worker_state_key

    r = redis.Redis.from_url(redis_url.replace("valkey://", "redis://", 1))
    try:
        pid = r.hget(worker_state_key(deployment_id), "pid")
    finally:
        r.close()
    return int(pid) if pid else None


def started_at(pid: int) -> float:
    """When a process started, Unix time, to a clock tick. From its start in ticks since boot
    (/proc/PID/stat) against the uptime now: the boot time the kernel reports (psutil's
    ``create_time``) can be off by a second once the wall clock has been adjusted."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
