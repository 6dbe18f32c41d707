"""Control-plane load benchmark: ``python -m bench.api_load [--quick]``.

1. Throughput: 64 concurrent connections against the real API (authenticated
   ``GET /v1/loops/runs/{id}`` and ``GET /v1/loops/checkpoints?run_id=``) and against a bare
   Litestar app returning static JSON (the ceiling), same uvicorn settings, same run. The real
   API is measured as configured by default (its read cache on: a polled run is answered from
   memory until something writes to it) and with ``OPENLOOPS_READ_CACHE_SECONDS=0`` (every
   request runs its query).
2. List latency (one connection, so no queueing; read cache off) of the list routes while the checkpoints
   table grows 100 -> 1k -> 10k -> 100k rows (filler spread over many runs and orgs; the
   tenant's own result sets stay the same size), with the query plan Postgres picks.

Each server is its own process (``bench.serve``), the load generator another (``wrk``, or a
Python client when wrk is missing). Prints markdown tables at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.explain import explain_service_call
from bench.loadgen import GENERATOR_BOUND, LoadResult, client_name, ensure_wrk, run_load
from bench.machine import cpu_name, load_average
from bench.seed import TENANT_CHECKPOINTS, Tenant, grow_checkpoints, reset, seed_tenant
from bench.stack import BENCH_MODEL, Stack, start_stack
from control_plane.catalog import ModelCatalog
from control_plane.db.engine import Database
from control_plane.scheduler.ports import free_port

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(kind: str, stack: Stack, probe: str, **settings: str) -> Server:
    port = free_port()
    log = stack.data_dir / f"server-{kind}.log"
    env = {**os.environ, **stack.server_env(**settings), "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.serve", kind, str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    srv = Server(kind, port, proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(srv.base + probe, timeout=1.0).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    srv.stop()
    raise RuntimeError(f"{kind} server did not answer {probe} within 60 s: {log.read_text()[-3000:]}")


def check_responses(real: Server, tenant: Tenant, headers: dict[str, str]) -> None:
    """The measured routes answer what they should (a benchmark of 401s measures nothing)."""
    r = httpx.get(f"{real.base}/v1/loops/runs/{tenant.run_id}", headers=headers)
    assert r.status_code == 200 and r.json()["run"]["id"] == tenant.run_id, r.text
    r = httpx.get(f"{real.base}/v1/loops/checkpoints", params={"run_id": tenant.run_id}, headers=headers)
    assert r.status_code == 200 and len(r.json()["checkpoints"]) == TENANT_CHECKPOINTS, r.text
    r = httpx.get(f"{real.base}/v1/loops/checkpoints", params={"base_model": BENCH_MODEL}, headers=headers)
    assert r.status_code == 200 and len(r.json()["checkpoints"]) == TENANT_CHECKPOINTS, r.text
    r = httpx.get(f"{real.base}/v1/loops/runs", params={"base_model": BENCH_MODEL}, headers=headers)
    assert r.status_code == 200 and [x["id"] for x in r.json()["runs"]] == [tenant.run_id], r.text
    r = httpx.get(f"{real.base}/api/v1/checkpoints", params={"limit": 20}, headers=headers)
    assert r.status_code == 200 and len(r.json()["checkpoints"]) == TENANT_CHECKPOINTS, r.text
    r = httpx.get(f"{real.base}/api/v1/training_runs", params={"limit": 20}, headers=headers)
    assert r.status_code == 200 and r.json()["cursor"]["total_count"] >= 1, r.text


def machine_line() -> str:
    return (
        f"{os.cpu_count()} CPU cores ({cpu_name()}), Python {platform.python_version()}; the servers, Postgres, "
        f"Valkey and the load generator ({client_name()}) share these cores"
    )


def throughput(
    real: Server, uncached: Server, bare: Server, tenant: Tenant, headers: dict[str, str], args: argparse.Namespace
) -> list[str]:
    targets = [
        ("bare Litestar, static JSON (ceiling)", bare.base + "/static", {}),
        ("GET /v1/loops/runs/{id}", f"{real.base}/v1/loops/runs/{tenant.run_id}", headers),
        ("GET /v1/loops/checkpoints?run_id=", f"{real.base}/v1/loops/checkpoints?run_id={tenant.run_id}", headers),
        ("GET /v1/loops/runs/{id}, read cache off", f"{uncached.base}/v1/loops/runs/{tenant.run_id}", headers),
        (
            "GET /v1/loops/checkpoints?run_id=, read cache off",
            f"{uncached.base}/v1/loops/checkpoints?run_id={tenant.run_id}",
            headers,
        ),
    ]
    rows = []
    ceiling: LoadResult | None = None
    bound: list[str] = []
    for name, url, h in targets:
        run_load(url, h, connections=args.connections, seconds=args.warmup)
        res = run_load(url, h, connections=args.connections, seconds=args.seconds)
        ceiling = ceiling or res
        gen = f"{100 * res.client_cpu / res.client_threads:.0f}%"
        print(
            f"  {name}: {res.rps:.0f} req/s, p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms, errors {res.errors}, "
            f"generator CPU {gen} of {res.client_threads} thread(s)"
        )
        if res.generator_bound:
            bound.append(name)
        # a ratio means something only when neither run was paced by the generator
        ratio = "n/a" if res.generator_bound or ceiling.generator_bound else f"{100 * res.rps / ceiling.rps:.0f}%"
        rows.append(
            f"| {name} | {res.rps:,.0f} | {res.p50_ms:.1f} | {res.p99_ms:.1f} | {ratio} | {res.errors} | {gen} |"
        )
    log = "off" if args.no_access_log else "on (the default)"
    if bound:
        rows.append("")
        rows.append(
            f"The load generator ({client_name()}) was the bottleneck for: {'; '.join(bound)} — its threads were busy "
            f"{100 * GENERATOR_BOUND:.0f}%+ of the time, so those rows measure the generator, not the server, and "
            "get no ratio. Install wrk (`apt-get install wrk`; this benchmark does so when it runs as root)."
        )
    return [
        f"Throughput, {args.connections} connections, {args.seconds:g} s per target after {args.warmup:g} s warm-up; "
        f"access log of the real app {log}:",
        "",
        "| target | req/s | p50 ms | p99 ms | vs bare | errors | generator CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def list_routes(tenant: Tenant) -> list[tuple[str, str, str, dict[str, str | None]]]:
    """(label, path, service call for EXPLAIN, its arguments). The tenant's own result sets
    are the same size at every table size, except the Tinker pages' total counts: a tenth of
    the filler belongs to the tenant's user."""
    return [
        (
            "checkpoints?run_id=",
            f"/v1/loops/checkpoints?run_id={tenant.run_id}",
            "checkpoints",
            {"run_id": tenant.run_id, "base_model": None, "checkpoint_path": None},
        ),
        (
            "checkpoints?base_model=",
            f"/v1/loops/checkpoints?base_model={BENCH_MODEL}",
            "checkpoints",
            {"run_id": None, "base_model": BENCH_MODEL, "checkpoint_path": None},
        ),
        (
            "checkpoints?checkpoint_path=",
            f"/v1/loops/checkpoints?checkpoint_path={tenant.checkpoint_path}",
            "checkpoints",
            {"run_id": None, "base_model": None, "checkpoint_path": tenant.checkpoint_path},
        ),
        (
            "checkpoints/{id}/files?page_size=2",
            f"/v1/loops/checkpoints/{tenant.checkpoint_id}/files?page_size=2",
            "files",
            {"checkpoint_id": tenant.checkpoint_id},
        ),
        ("runs?base_model=", f"/v1/loops/runs?base_model={BENCH_MODEL}", "runs", {"base_model": BENCH_MODEL}),
        # Tinker REST pages (limit/offset with a total count) over everything the caller owns
        ("tinker checkpoints?limit=20", "/api/v1/checkpoints?limit=20", "tinker_checkpoints", {}),
        ("tinker training_runs?limit=20", "/api/v1/training_runs?limit=20", "tinker_runs", {}),
    ]


async def list_latency(
    db: Database, real: Server, tenant: Tenant, headers: dict[str, str], args: argparse.Namespace
) -> list[str]:
    rows = []
    by_route: dict[str, list[tuple[int, float, float]]] = {}  # label -> [(rows, p50 ms, SQL ms)]
    for size in args.sizes:
        n = await grow_checkpoints(db, tenant, size)
        for label, path, call, kwargs in list_routes(tenant):
            res: LoadResult = await asyncio.to_thread(
                run_load, real.base + path, headers, connections=1, seconds=args.list_seconds
            )
            plan, sql_ms = await explain_service_call(db, tenant, call, kwargs)
            print(f"  {n:>7} rows  {label}: p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms, {plan}")
            rows.append(f"| {n:,} | {label} | {res.p50_ms:.2f} | {res.p99_ms:.2f} | {res.errors} | {plan} |")
            by_route.setdefault(label, []).append((n, res.p50_ms, sql_ms))
    first, last = args.sizes[0], args.sizes[-1]
    summary = [
        f"| {label} | {pts[0][1]:.2f} → {pts[-1][1]:.2f} | {pts[0][2]:.2f} → {pts[-1][2]:.2f} |"
        for label, pts in by_route.items()
    ]
    return [
        f"List latency, 1 connection, {args.list_seconds:g} s per route and size "
        f"(summary: smallest → largest table, {first:,} → {last:,} checkpoint rows):",
        "",
        "| route | HTTP p50 ms | SQL ms (EXPLAIN ANALYZE) |",
        "|---|---:|---:|",
        *summary,
        "",
        "| checkpoints rows | route | p50 ms | p99 ms | errors | plan: scans (SQL time, all statements) |",
        "|---:|---|---:|---:|---:|---|",
        *rows,
    ]


async def main_async(args: argparse.Namespace) -> int:
    ensure_wrk(install=not args.no_install)
    machine, start_load = machine_line(), load_average()
    print(f"machine: {machine}; load average {start_load:.1f}")
    stack = start_stack()
    servers: list[Server] = []
    db = Database(stack.database_url)
    try:
        await reset(db)
        tenant = await seed_tenant(db, ModelCatalog.load(stack.data_dir / "catalog.yaml"))
        await grow_checkpoints(db, tenant, args.sizes[0])
        headers = {"Authorization": f"Bearer {tenant.key}"}
        servers.append(start_server("bare", stack, "/static"))
        access_log = {"OPENLOOPS_ACCESS_LOG": "false"} if args.no_access_log else {}
        servers.append(start_server("real", stack, "/healthz", **access_log))
        # the same app with its read cache off: every request queries Postgres
        servers.append(start_server("real", stack, "/healthz", OPENLOOPS_READ_CACHE_SECONDS="0", **access_log))
        bare, real, uncached = servers
        check_responses(real, tenant, headers)
        check_responses(uncached, tenant, headers)
        print("throughput:")
        report = await asyncio.to_thread(throughput, real, uncached, bare, tenant, headers, args)
        print("list latency (read cache off, so that every request runs its query):")
        report += ["", *await list_latency(db, uncached, tenant, headers, args)]
        print()
        print(f"Machine: {machine}. Load average {start_load:.1f} at start, {load_average():.1f} at the end.")
        print()
        print("\n".join(report))
    finally:
        for srv in servers:
            srv.stop()
        await db.close()
        stack.stop()
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run: 3 s per target, sizes 100 and 10k")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=None, help="measurement time per throughput target")
    ap.add_argument("--list-seconds", type=float, default=None, help="measurement time per list route and size")
    ap.add_argument("--sizes", default=None, help="checkpoint table sizes, e.g. 100,1000,10000,100000")
    ap.add_argument("--no-access-log", action="store_true", help="real app without its JSON access log (on by default)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install wrk when it is missing")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 15.0)
    args.warmup = 1.0 if args.quick else 3.0
    args.list_seconds = args.list_seconds or (1.0 if args.quick else 3.0)
    sizes = args.sizes or ("100,10000" if args.quick else "100,1000,10000,100000")
    args.sizes = sorted(int(x) for x in sizes.split(","))
    return args


def main() -> int:
    return asyncio.run(main_async(parse_args(sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
