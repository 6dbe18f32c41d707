"""Control-plane load benchmark: ``python -m bench.api_load [--quick] [--readme]``.

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
Python client when wrk is missing). Prints the machine first and the results as markdown at the
end; ``--readme`` also writes them into bench/README.md (between the markers of ``api_load``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.explain import explain_service_call
from bench.loadgen import GENERATOR_BOUND, LoadResult, client_name, ensure_wrk, run_load
from bench.machine import load_average, machine_line
from bench.readme_section import publish
from bench.seed import TENANT_CHECKPOINTS, Tenant, grow_checkpoints, reset, seed_tenant
from bench.stack import BENCH_MODEL, Stack, start_stack
from control_plane.catalog import ModelCatalog
from control_plane.db.engine import Database
from control_plane.scheduler.ports import free_port

REPO = Path(__file__).resolve().parents[1]
# the targets at 64 connections: the real app as configured by default, against the bare one
TARGET_RATIO = 0.5
TARGET_P99_MS = 25.0


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


def shared_by() -> str:
    """What shares the machine's cores with the servers under load."""
    return f"the servers, PostgreSQL, Valkey and the load generator ({client_name()}) share these cores"


@dataclass(frozen=True)
class ThroughputRow:
    label: str
    result: LoadResult
    default: bool  # the real app as configured by default: the targets are about these rows


def throughput(
    real: Server, uncached: Server, bare: Server, tenant: Tenant, headers: dict[str, str], args: argparse.Namespace
) -> list[ThroughputRow]:
    """Each target at ``args.connections`` after a warm-up; the ceiling (the bare app) first."""
    run_path, checkpoints_path = f"/v1/loops/runs/{tenant.run_id}", f"/v1/loops/checkpoints?run_id={tenant.run_id}"
    targets = [
        ("bare Litestar, static JSON (ceiling)", bare.base + "/static", {}, False),
        ("`GET /v1/loops/runs/{id}` (authenticated)", real.base + run_path, headers, True),
        (
            f"`GET /v1/loops/checkpoints?run_id=` (authenticated, {TENANT_CHECKPOINTS} checkpoints)",
            real.base + checkpoints_path,
            headers,
            True,
        ),
        ("`GET /v1/loops/runs/{id}`, read cache off", uncached.base + run_path, headers, False),
        ("`GET /v1/loops/checkpoints?run_id=`, read cache off", uncached.base + checkpoints_path, headers, False),
    ]
    rows = []
    for label, url, h, default in targets:
        run_load(url, h, connections=args.connections, seconds=args.warmup)
        res = run_load(url, h, connections=args.connections, seconds=args.seconds)
        print(
            f"  {label}: {res.rps:.0f} req/s, p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms, errors {res.errors}, "
            f"generator CPU {100 * res.client_cpu / res.client_threads:.0f}% of {res.client_threads} thread(s)"
        )
        rows.append(ThroughputRow(label, res, default))
    return rows


def list_routes(tenant: Tenant) -> list[tuple[str, str, str, dict[str, str | None]]]:
    """(label, path, service call for EXPLAIN, its arguments). The tenant's own result sets
    are the same size at every table size, except the Tinker pages' total counts: a tenth of
    the filler belongs to the tenant's user."""
    return [
        (
            "`GET /v1/loops/checkpoints?run_id=`",
            f"/v1/loops/checkpoints?run_id={tenant.run_id}",
            "checkpoints",
            {"run_id": tenant.run_id, "base_model": None, "checkpoint_path": None},
        ),
        (
            "`GET /v1/loops/checkpoints?base_model=`",
            f"/v1/loops/checkpoints?base_model={BENCH_MODEL}",
            "checkpoints",
            {"run_id": None, "base_model": BENCH_MODEL, "checkpoint_path": None},
        ),
        (
            "`GET /v1/loops/checkpoints?checkpoint_path=`",
            f"/v1/loops/checkpoints?checkpoint_path={tenant.checkpoint_path}",
            "checkpoints",
            {"run_id": None, "base_model": None, "checkpoint_path": tenant.checkpoint_path},
        ),
        (
            "`GET /v1/loops/checkpoints/{id}/files?page_size=2`",
            f"/v1/loops/checkpoints/{tenant.checkpoint_id}/files?page_size=2",
            "files",
            {"checkpoint_id": tenant.checkpoint_id},
        ),
        (
            "`GET /v1/loops/runs?base_model=`",
            f"/v1/loops/runs?base_model={BENCH_MODEL}",
            "runs",
            {"base_model": BENCH_MODEL},
        ),
        # Tinker REST pages (limit/offset with a total count) over everything the caller owns
        ("`GET /api/v1/checkpoints?limit=20` (Tinker)", "/api/v1/checkpoints?limit=20", "tinker_checkpoints", {}),
        ("`GET /api/v1/training_runs?limit=20` (Tinker)", "/api/v1/training_runs?limit=20", "tinker_runs", {}),
    ]


@dataclass(frozen=True)
class ListPoint:
    """One list route at one size of the checkpoints table."""

    label: str
    rows: int  # in the checkpoints table
    result: LoadResult
    sql_ms: float  # EXPLAIN ANALYZE's execution time of the route's SQL, all statements
    plan: str  # its scans


async def list_latency(
    db: Database, real: Server, tenant: Tenant, headers: dict[str, str], args: argparse.Namespace
) -> list[ListPoint]:
    points = []
    for size in args.sizes:
        n = await grow_checkpoints(db, tenant, size)
        for label, path, call, kwargs in list_routes(tenant):
            res: LoadResult = await asyncio.to_thread(
                run_load, real.base + path, headers, connections=1, seconds=args.list_seconds
            )
            plan, sql_ms = await explain_service_call(db, tenant, call, kwargs)
            print(f"  {n:>7} rows  {label}: p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms, {plan}")
            points.append(ListPoint(label, n, res, sql_ms, plan))
    return points


@dataclass(frozen=True)
class ApiLoadReport:
    date: str
    quick: bool
    machine: str  # bench.machine's line at the start
    end_load: float
    connections: int
    seconds: float  # per throughput target
    warmup: float  # before each
    access_log: bool  # the real app's
    throughput: list[ThroughputRow]  # the ceiling first
    lists: list[ListPoint]  # every route at every size, the sizes in order


def short_count(n: int) -> str:
    """A table size as a column header says it: 100, 1k, 100k."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def render(report: ApiLoadReport) -> str:
    """The README section's body: when, where, both tables, the targets."""
    rows = report.throughput
    return "\n".join(
        [
            f"### Latest results ({report.date}{', --quick' if report.quick else ''})",
            "",
            f"{report.machine} at start, {report.end_load:.2f} at the end; the servers, PostgreSQL, Valkey and the load "
            f"generator (`{rows[0].result.client}`) share these cores. {report.connections} connections, "
            f"{report.seconds:g} s per target after {report.warmup:g} s of warm-up. The real app as configured by "
            f"default (access log {'on' if report.access_log else 'off'}, read cache on), and once more with "
            "`OPENLOOPS_READ_CACHE_SECONDS=0`:",
            "",
            *throughput_table(rows),
            "",
            targets_sentence(rows, report.connections),
            "",
            *list_table(report.lists),
        ]
    )


def vs_ceiling(row: ThroughputRow, ceiling: ThroughputRow) -> float | None:
    """The row's req/s as a share of the ceiling's; None when the load generator paced either."""
    if row.result.generator_bound or ceiling.result.generator_bound or not ceiling.result.rps:
        return None
    return row.result.rps / ceiling.result.rps


def throughput_table(rows: list[ThroughputRow]) -> list[str]:
    lines = ["| target | req/s | p50 ms | p99 ms | vs bare |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        ratio = vs_ceiling(row, rows[0])
        res = row.result
        lines.append(
            f"| {row.label} | {res.rps:,.0f} | {res.p50_ms:.1f} | {res.p99_ms:.1f} "
            f"| {'n/a' if ratio is None else f'{ratio:.0%}'} |"
        )
    if bound := [r.label for r in rows if r.result.generator_bound]:
        lines += [
            "",
            f"The load generator (`{rows[0].result.client}`) was the bottleneck for: {'; '.join(bound)} — its threads "
            f"were busy {GENERATOR_BOUND:.0%}+ of the time, so those rows measure the generator, not the server, and "
            "get no ratio. Install wrk (`apt-get install wrk`; this benchmark does so when it runs as root).",
        ]
    if failed := [f"{r.label} {r.result.errors:,}" for r in rows if r.result.errors]:
        lines += ["", f"Errors (non-2xx or socket): {'; '.join(failed)}."]
    return lines


def targets_sentence(rows: list[ThroughputRow], connections: int) -> str:
    """The targets against the real app as configured by default."""
    targets = (
        f"Targets: ≥ {TARGET_RATIO:.0%} of the bare app and p99 < {TARGET_P99_MS:g} ms at {connections} connections"
    )
    default = [r for r in rows if r.default]
    ratios = [vs_ceiling(r, rows[0]) for r in default]
    if any(x is None for x in ratios):
        return f"{targets}: not measured as configured by default (the load generator set the pace)."
    lowest = min(x for x in ratios if x is not None)
    highest_p99 = max(r.result.p99_ms for r in default)
    met = lowest >= TARGET_RATIO and highest_p99 < TARGET_P99_MS and not any(r.result.errors for r in default)
    return (
        f"{targets}, {'met' if met else 'not met'} as configured by default (lowest {lowest:.0%}, highest p99 "
        f"{highest_p99:.1f} ms)."
    )


def list_table(points: list[ListPoint]) -> list[str]:
    """Each route's HTTP p50 and SQL time, at the smallest and the largest table."""
    first, last = min(p.rows for p in points), max(p.rows for p in points)
    by_route: dict[str, list[ListPoint]] = {}
    for p in points:
        by_route.setdefault(p.label, []).append(p)
    sizes = f"{short_count(first)} → {short_count(last)} rows"
    lines = [
        "List latency, one connection, read cache off (every request runs its query), while the checkpoints table "
        f"grows from {first:,} to {last:,} rows; SQL time is PostgreSQL's `EXPLAIN ANALYZE` of the service's SQL:",
        "",
        f"| route | HTTP p50 ms, {sizes} | SQL ms, {sizes} |",
        "|---|---:|---:|",
    ]
    for label, pts in by_route.items():
        a, b = pts[0], pts[-1]
        lines.append(f"| {label} | {a.result.p50_ms:.2f} → {b.result.p50_ms:.2f} | {a.sql_ms:.2f} → {b.sql_ms:.2f} |")
    if failed := [f"{p.label} at {p.rows:,} rows {p.result.errors:,}" for p in points if p.result.errors]:
        lines += ["", f"Errors (non-2xx or socket): {'; '.join(failed)}."]
    return lines


def plans_table(points: list[ListPoint]) -> list[str]:
    """Every route at every size with its p99 and plan (printed, not written to the README)."""
    return [
        "| checkpoints rows | route | p50 ms | p99 ms | errors | plan: scans (SQL time, all statements) |",
        "|---:|---|---:|---:|---:|---|",
        *(
            f"| {p.rows:,} | {p.label} | {p.result.p50_ms:.2f} | {p.result.p99_ms:.2f} | {p.result.errors} | {p.plan} |"
            for p in points
        ),
    ]


async def main_async(args: argparse.Namespace) -> int:
    ensure_wrk(install=not args.no_install)
    machine = machine_line()
    print(f"machine: {machine}; {shared_by()}", flush=True)
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
        rows = await asyncio.to_thread(throughput, real, uncached, bare, tenant, headers, args)
        print("list latency (read cache off, so that every request runs its query):")
        points = await list_latency(db, uncached, tenant, headers, args)
    finally:
        for srv in servers:
            srv.stop()
        await db.close()
        stack.stop()
    report = ApiLoadReport(
        date=datetime.date.today().isoformat(),
        quick=args.quick,
        machine=machine,
        end_load=load_average(),
        connections=args.connections,
        seconds=args.seconds,
        warmup=args.warmup,
        access_log=not args.no_access_log,
        throughput=rows,
        lists=points,
    )
    print()
    print("\n".join(plans_table(points)))
    publish("api_load", render(report), readme=args.readme)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run: 3 s per target, sizes 100 and 10k")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=None, help="measurement time per throughput target")
    ap.add_argument("--list-seconds", type=float, default=None, help="measurement time per list route and size")
    ap.add_argument("--sizes", default=None, help="checkpoint table sizes, e.g. 100,1000,10000,100000")
    ap.add_argument("--no-access-log", action="store_true", help="real app without its JSON access log (on by default)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install wrk when it is missing")
    ap.add_argument("--readme", action="store_true", help="write the results into bench/README.md (its section)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 15.0)
    args.warmup = 1.0 if args.quick else 3.0
    args.list_seconds = args.list_seconds or (1.0 if args.quick else 3.0)
    sizes = args.sizes or ("100,10000" if args.quick else "100,1000,10000,100000")
    args.sizes = sorted(int(x) for x in sizes.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
