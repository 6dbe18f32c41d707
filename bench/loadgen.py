"""Load generators, each in its own process: ``wrk`` when it is installed (Debian: ``apt-get
install wrk``), else a Python client (httpx, one connection per worker) that is itself
CPU-bound and therefore measures less than the server can do."""

from __future__ import annotations

import asyncio
import json
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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def client_name() -> str:
    return "wrk" if shutil.which("wrk") else "python-httpx"


def run_load(url: str, headers: dict[str, str], *, connections: int, seconds: float, threads: int = 1) -> LoadResult:
    if shutil.which("wrk"):
        return _run_wrk(url, headers, connections=connections, seconds=seconds, threads=threads)
    cmd = [sys.executable, "-m", "bench.loadgen", url, json.dumps(headers), str(connections), str(seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return LoadResult(**json.loads(out.strip().splitlines()[-1]))


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
