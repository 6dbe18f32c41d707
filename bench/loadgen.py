"""Load generators, each in its own process: ``wrk`` when it is installed (Debian: ``apt-get
install wrk``; :func:`ensure_wrk` installs it when it can), else a Python client (httpx, one
connection per worker) that is itself CPU-bound and therefore measures less than the server can
do. Every run reports the CPU its generator used (:attr:`LoadResult.client_cpu`, cores): a
generator that kept its threads busy was the bottleneck (:attr:`LoadResult.generator_bound`),
and what it measured is the generator, not the server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# wrk calls done() once at the end; print what we need as one JSON line
_WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    errors: int  # non-2xx responses + socket errors
    p50_ms: float
    p99_ms: float
    max_ms: float
    client: str
    client_cpu: float = 0.0  # cores the generator kept busy on average (CPU time / wall time)
    client_threads: int = 1

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def generator_bound(self) -> bool:
        """The generator's threads were busy ~all the time: it, not the server, set the pace."""
        return self.client_cpu >= GENERATOR_BOUND * self.client_threads


GENERATOR_BOUND = 0.85  # of each generator thread


def client_name() -> str:
    return "wrk" if shutil.which("wrk") else "python-httpx"


def ensure_wrk(install: bool = True) -> str | None:
    """``wrk``'s path; when it is missing and ``install`` allows, install Debian's package
    (as root with apt-get, the only way this machine gets it). None when it stays missing."""
    if (path := shutil.which("wrk")) or not install:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("wrk is not installed (apt-get install wrk); falling back to the Python load generator")
        return None
    print("installing wrk (Debian's package) for a load generator that can saturate the server ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "install", "-y", "-q", "wrk"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "wrk"],
    ):
        if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0 and shutil.which("wrk"):
            return shutil.which("wrk")
    print("could not install wrk; falling back to the Python load generator")
    return None


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_load(url: str, headers: dict[str, str], *, connections: int, seconds: float, threads: int = 1) -> LoadResult:
    cpu0, t0 = _children_cpu(), time.perf_counter()
    if shutil.which("wrk"):
        res = _run_wrk(url, headers, connections=connections, seconds=seconds, threads=threads)
        nthreads = min(threads, connections)
    else:
        cmd = [sys.executable, "-m", "bench.loadgen", url, json.dumps(headers), str(connections), str(seconds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res, nthreads = LoadResult(**json.loads(out.strip().splitlines()[-1])), 1
    # the generator's CPU over its run (start-up included: a slight overestimate)
    busy = (_children_cpu() - cpu0) / max(time.perf_counter() - t0, 1e-9)
    return dataclasses.replace(res, client_cpu=busy, client_threads=nthreads)


def _run_wrk(url: str, headers: dict[str, str], *, connections: int, seconds: float, threads: int) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA)
        script = f.name
    try:
        cmd = [
            "wrk",
            "-t",
            str(min(threads, connections)),
            "-c",
            str(connections),
            "-d",
            f"{seconds:g}s",
            "--timeout",
            "10s",
            "-s",
            script,
        ]
        for k, v in headers.items():
            cmd += ["-H", f"{k}: {v}"]
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        out = proc.stdout
    finally:
        Path(script).unlink(missing_ok=True)
    line = next(x for x in out.splitlines() if x.startswith("BENCH_JSON "))
    d = json.loads(line.split(" ", 1)[1])
    return LoadResult(
        requests=d["requests"],
        seconds=d["duration_us"] / 1e6,
        errors=d["non2xx"] + d["socket_errors"],
        p50_ms=d["p50_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        client="wrk",
    )


async def _python_load(url: str, headers: dict[str, str], connections: int, seconds: float) -> dict[str, object]:
    import httpx

    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10.0) as client:
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = await client.get(url)
                    ok = r.status_code < 300
                except httpx.HTTPError:
                    ok = False
                lat.append(time.perf_counter() - t0)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0

    return dict(
        requests=len(lat),
        seconds=elapsed,
        errors=errors,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        max_ms=lat[-1] * 1000 if lat else 0.0,
        client="python-httpx",
    )


if __name__ == "__main__":
    _url, _headers, _conns, _secs = sys.argv[1:5]
    print(json.dumps(asyncio.run(_python_load(_url, json.loads(_headers), int(_conns), float(_secs)))))
