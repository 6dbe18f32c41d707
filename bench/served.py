"""Served-model benchmark: ``python -m bench.served [--quick] [--rounds 9] [--ttft 50] [--readme]``.

Runs ``openloops serve`` (API + controller + local process backend) as its own process on
embedded PostgreSQL + Valkey with the tiny model, then:

1. **A checkpoint to serve**: one LoRA step through the tinker SDK and
   ``save_weights_for_sampler("bench")``; its checkpoint id from
   ``GET /v1/loops/checkpoints?checkpoint_path=``.
2. **Cold start**: ``POST /v1/loops/checkpoints/deploy`` -> the served model ACTIVE (its own
   vLLM server started by the controller, adapter loaded), as ``GET`` shows it to clients.
3. **Throughput**: 64 concurrent ``/completions`` x 64 tokens (``ignore_eos``, so exactly 64;
   temperature 1, a fixed seed per request) through openloops (``base_url``, ``model`` = the
   checkpoint's name) and straight to the same vLLM (the endpoint and adapter name read from
   the database, ``model`` = the adapter), the same bodies from the same client (aiohttp), in
   rounds that alternate the order. The ratio to direct is given as the ratio of the medians
   and as the median of each round's ratio (robust to the machine's speed drifting), with the
   CPU the openloops process spent per proxied request (from /proc: steadier than the
   throughput on a shared machine).
4. **Time to first token**: streamed ``/completions`` (``stream: true``, 16 tokens), one at a
   time (no queueing), alternating the paths request by request: the time from sending the
   request to the first SSE ``data:`` event; p50 / p90 of each path and the added p50.

Prints the machine and its load average first, and the results as markdown at the end;
``--readme`` also writes them into bench/README.md (between the markers of ``served``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.live import (
    PROMPT,
    Server,
    client_session,
    make_key,
    pct,
    prompt_datum,
    start_openloops,
)
from bench.machine import load_average, machine_line
from bench.readme_section import publish
from bench.stack import Stack, start_stack
from control_plane.catalog import ModelCatalog
from control_plane.local_mode.models import prepare

CONCURRENCY = 64
TOKENS = 64
TTFT_TOKENS = 16
CHECKPOINT = "bench"
TARGET_RATIO = 0.9  # of direct throughput, through openloops
TARGET_ADDED_TTFT_MS = 5.0  # added time to first token, p50
SHARED_BY = (
    "the API, controller, PostgreSQL, Valkey, the trainer worker, the served model's vLLM (CPU, float32) and the "
    "load generator share these cores"
)


def completion_body(model: str, seed: int, *, max_tokens: int = TOKENS, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "ignore_eos": True,
        "stream": stream,
    }


class Route:
    """One way to a served model's ``/completions``: its root URL, headers, and the ``model``
    to name."""

    def __init__(self, name: str, root: str, model: str, headers: dict[str, str]) -> None:
        self.name, self.root, self.model, self.headers = name, root.rstrip("/"), model, headers


async def burst(path: Route, round_no: int) -> float:
    """64 concurrent completions of 64 tokens; seconds until the last one is answered."""
    bodies = [completion_body(path.model, round_no * 1000 + i) for i in range(CONCURRENCY)]
    async with client_session(path.root + "/", CONCURRENCY * 2, **path.headers) as c:

        async def one(b: dict[str, Any]) -> None:
            async with c.post("completions", json=b) as r:
                if r.status != 200:
                    raise RuntimeError(f"{path.name}: HTTP {r.status}: {await r.text()}")
                out = await r.json()
                assert out["usage"]["completion_tokens"] == TOKENS, out["usage"]
                assert out["model"] == path.model, out["model"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0


async def first_tokens(paths: list[Route], n: int) -> dict[str, list[float]]:
    """``n`` streamed requests per path, one at a time, the paths alternating request by
    request (and which goes first alternating too): seconds to the first ``data:`` event."""
    out: dict[str, list[float]] = {p.name: [] for p in paths}
    sessions = {p.name: client_session(p.root + "/", 4, **p.headers) for p in paths}
    try:
        for i in range(n):
            for p in paths if i % 2 == 0 else list(reversed(paths)):
                c = sessions[p.name]
                t0 = time.perf_counter()
                first = None
                async with c.post(
                    "completions", json=completion_body(p.model, i, max_tokens=TTFT_TOKENS, stream=True)
                ) as r:
                    if r.status != 200:
                        raise RuntimeError(f"{p.name}: HTTP {r.status}: {await r.text()}")
                    tail = b""
                    async for chunk in r.content.iter_any():
                        if first is None and b"data:" in tail + chunk:
                            first = time.perf_counter() - t0
                        tail = (tail + chunk)[-64:]
                    # the whole stream is read before the next request: nothing queues
                    assert tail.rstrip().endswith(b"data: [DONE]"), tail
                assert first is not None
                out[p.name].append(first)
    finally:
        for s in sessions.values():
            await s.close()
    return out


def served_rows(database_url: str, served_model_id: str) -> tuple[str, str]:
    """The served model's vLLM endpoint and its checkpoint's adapter name (not in the API)."""

    async def q() -> tuple[str, str]:
        from sqlalchemy import select

        from control_plane.db.engine import Database
        from control_plane.db.models import ServedModel, ServedModelCheckpoint

        db = Database(database_url)
        try:
            async with db.session() as s:
                row = await s.get(ServedModel, served_model_id)
                assert row is not None and row.endpoint, row
                adapter = (
                    await s.execute(
                        select(ServedModelCheckpoint.adapter_name).where(
                            ServedModelCheckpoint.served_model_id == served_model_id
                        )
                    )
                ).scalar_one()
                return row.endpoint, adapter
        finally:
            await db.close()

    return asyncio.run(q())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Deployed:
    """A served model of one sampler checkpoint, ACTIVE and verified, on ``server``."""

    server: Server
    key: str
    served_model_id: str
    cold_start_s: float
    via: Route  # through openloops: base_url, the checkpoint's name
    direct: Route  # straight to its vLLM: the endpoint and adapter name from the database


def deploy_checkpoint(stack: Stack) -> Deployed:
    """Start ``openloops serve`` with the tiny model, save a sampler checkpoint through the
    tinker SDK, deploy it and wait until it is ACTIVE and verified. The server is stopped if
    anything fails."""
    model = prepare("tiny", stack.data_dir / "models", quiet=True)
    catalog = stack.data_dir / "served-catalog.yaml"
    ModelCatalog([model]).dump(catalog)
    key = asyncio.run(make_key(stack.database_url, "bench-served"))
    # the controller at its default interval (1 s): it runs in the API's process, and each
    # pass takes the event loop the proxy answers on for a moment
    server = start_openloops(stack, catalog, "served", OPENLOOPS_CONTROLLER_INTERVAL_SECONDS="1.0")
    try:
        os.environ["TINKER_TELEMETRY"] = "0"
        import tinker
        from tinker import types

        # a sampler checkpoint: one LoRA step, saved for sampling
        service = tinker.ServiceClient(base_url=server.base, api_key=key)
        tc = service.create_lora_training_client(model.name, rank=8, seed=0).result()
        tc.forward_backward([prompt_datum(PROMPT)], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        tinker_path = tc.save_weights_for_sampler(CHECKPOINT).result().path
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}, timeout=60.0) as http:
            found = http.get("/v1/loops/checkpoints", params={"checkpoint_path": tinker_path}).json()["checkpoints"]

            # deploy -> ACTIVE
            t0 = time.perf_counter()
            r = http.post(
                "/v1/loops/checkpoints/deploy",
                json={
                    "checkpoint_ids": [found[0]["id"]],
                    "model_name": "bench-served",
                    "scale_down_delay_seconds": 3600,
                },
            )
            assert r.status_code == 200, r.text
            sm_id, base_url = r.json()["model_id"], r.json()["base_url"]
            deadline = time.monotonic() + 900
            while True:
                status = http.get(f"/v1/loops/served_models/{sm_id}").json()["served_model"]["status"]
                if status["name"] == "ACTIVE":
                    break
                if status["name"] in ("FAILED", "DEPLOY_FAILED", "INACTIVE") or time.monotonic() > deadline:
                    raise RuntimeError(f"served model not ACTIVE: {status}; see {server.log}")
                time.sleep(0.1)
            cold = time.perf_counter() - t0
            # its verification (the trainer's and vLLM's logprobs on a probe) runs once it is
            # ACTIVE: wait for it, so that it takes no CPU from the measurements
            while http.get(f"/v1/loops/served_models/{sm_id}").json()["served_model"]["verification"] == "pending":
                if time.monotonic() > deadline:
                    raise RuntimeError("the served model's verification did not finish")
                time.sleep(0.2)
        endpoint, adapter = served_rows(stack.database_url, sm_id)
    except BaseException:
        server.stop()
        raise
    return Deployed(
        server,
        key,
        sm_id,
        cold,
        Route("openloops", base_url, CHECKPOINT, {"Authorization": f"Bearer {key}"}),
        Route("direct", endpoint + "/v1", adapter, {}),
    )


@dataclass(frozen=True)
class ServedReport:
    date: str
    quick: bool
    machine: str  # bench.machine's line at the start
    end_load: float
    cold_start_s: float
    round_s: dict[str, list[float]]  # "direct", "openloops" -> each round's time for CONCURRENCY x TOKENS tokens
    api_cpu_ms: dict[str, float]  # the openloops process's CPU per request, during each path's rounds
    ttft_s: dict[str, list[float]]  # "direct", "openloops" -> every streamed request's time to first token


def tokens_per_s(seconds: float) -> float:
    return CONCURRENCY * TOKENS / seconds


def render(report: ServedReport) -> str:
    """The README section's body: when, where, the table, the targets."""
    times, cpu = report.round_s, report.api_cpu_ms
    rounds = len(times["direct"])
    tps = {k: tokens_per_s(statistics.median(v)) for k, v in times.items()}
    paired = statistics.median(d / o for d, o in zip(times["direct"], times["openloops"], strict=True))
    spread = {k: f"{tokens_per_s(max(v)):,.0f}–{tokens_per_s(min(v)):,.0f}" for k, v in times.items()}
    ms = {k: (pct(v, 0.5) * 1000, pct(v, 0.9) * 1000) for k, v in report.ttft_s.items()}
    added = ms["openloops"][0] - ms["direct"][0]
    met = {"throughput": paired >= TARGET_RATIO, "time to first token": added < TARGET_ADDED_TTFT_MS}
    if all(met.values()):
        verdict = "both met"
    elif any(met.values()):
        verdict = "; ".join(f"{k} {'met' if ok else 'not met'}" for k, ok in met.items())
    else:
        verdict = "neither met"
    quick = ", --quick" if report.quick else ""
    return "\n".join(
        [
            f"### Latest results ({report.date}, tiny model, {rounds} rounds{quick})",
            "",
            f"{report.machine} at start, {report.end_load:.2f} at the end; {SHARED_BY}.",
            "",
            "| measurement | result |",
            "|---|---|",
            f"| cold start: deploy → ACTIVE (own vLLM server started, adapter loaded) | {report.cold_start_s:.1f} s |",
            f"| {CONCURRENCY} × {TOKENS} tokens straight to vLLM | {tps['direct']:,.0f} tok/s |",
            f"| through openloops (`base_url` `/completions`, checkpoint name) | {tps['openloops']:,.0f} tok/s "
            f"({tps['openloops'] / tps['direct']:.2f}; per round {paired:.2f}) |",
            f"| single rounds, direct / through openloops | {spread['direct']} / {spread['openloops']} tok/s |",
            "| CPU of the openloops process per proxied request (during the direct rounds: its controller) "
            f"| {cpu['openloops']:.2f} ms ({cpu['direct']:.2f} ms) |",
            f"| time to first token straight to vLLM, p50 / p90 | {ms['direct'][0]:.1f} / {ms['direct'][1]:.1f} ms |",
            f"| through openloops, p50 / p90 | {ms['openloops'][0]:.1f} / {ms['openloops'][1]:.1f} ms |",
            f"| added time to first token, p50 | {added:+.1f} ms |",
            "",
            f"Targets: ≥ {TARGET_RATIO} of direct throughput and added time to first token p50 < "
            f"{TARGET_ADDED_TTFT_MS:.0f} ms, {verdict} (per round {paired:.2f}, {added:+.1f} ms).",
        ]
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds and 10 streamed requests per path")
    ap.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 9, --quick 3)")
    ap.add_argument("--ttft", type=int, default=None, help="streamed requests per path (default 50, --quick 10)")
    ap.add_argument("--readme", action="store_true", help="write the results into bench/README.md (its section)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 9)
    n_ttft = args.ttft or (10 if args.quick else 50)

    machine = machine_line()
    print(f"machine: {machine}; {SHARED_BY}", flush=True)

    stack = start_stack()
    server = None
    try:
        dep = deploy_checkpoint(stack)
        server, cold, via, direct = dep.server, dep.cold_start_s, dep.via, dep.direct
        print(f"served model ACTIVE after {cold:.1f} s; vLLM at {direct.root}, adapter {direct.model}", flush=True)

        # warm-up: vLLM's first batches, the proxy's pools
        for p in (direct, via):
            asyncio.run(burst(p, 99))

        # 3. throughput, alternating
        times: dict[str, list[float]] = {"direct": [], "openloops": []}
        api_cpu: dict[str, float] = {"direct": 0.0, "openloops": 0.0}
        for rnd in range(rounds):
            for p in (direct, via) if rnd % 2 == 0 else (via, direct):
                c0 = cpu_seconds(server.proc.pid)
                dt = asyncio.run(burst(p, rnd))
                api_cpu[p.name] += cpu_seconds(server.proc.pid) - c0
                times[p.name].append(dt)
                print(f"round {rnd} {p.name}: {tokens_per_s(dt):.0f} tokens/s", flush=True)

        # 4. time to first token, one request at a time
        asyncio.run(first_tokens([direct, via], 2))  # warm-up
        ttft = asyncio.run(first_tokens([direct, via], n_ttft))
        end_load = load_average()
    finally:
        if server is not None:
            server.stop()
        stack.stop()
    report = ServedReport(
        date=datetime.date.today().isoformat(),
        quick=args.quick,
        machine=machine,
        end_load=end_load,
        cold_start_s=cold,
        round_s=times,
        # the API process's CPU per request: through openloops, and while the direct rounds
        # ran (its controller and background tasks only)
        api_cpu_ms={k: v * 1000 / (rounds * CONCURRENCY) for k, v in api_cpu.items()},
        ttft_s=ttft,
    )
    print()
    print(f"model openloops/tiny, LoRA rank 8; {rounds} rounds, {n_ttft} streamed requests per path\n")
    publish("served", render(report), readme=args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
