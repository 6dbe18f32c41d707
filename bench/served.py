"""Served-model benchmark: ``python -m bench.served [--quick] [--rounds 9] [--ttft 50]``.

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

Prints the machine and its load average first, and a markdown table at the end (paste it into
bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
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
from bench.machine import cpu_name, load_average
from bench.stack import Stack, start_stack
from control_plane.catalog import ModelCatalog
from control_plane.local_mode.models import prepare

CONCURRENCY = 64
TOKENS = 64
TTFT_TOKENS = 16
CHECKPOINT = "bench"


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 rounds and 10 streamed requests per path")
    ap.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 9, --quick 3)")
    ap.add_argument("--ttft", type=int, default=None, help="streamed requests per path (default 50, --quick 10)")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    n_ttft = args.ttft or (10 if args.quick else 50)

    start_load = load_average()
    machine = (
        f"{os.cpu_count()} CPU cores ({cpu_name()}); the API, controller, Postgres, Valkey, the trainer worker, "
        "the served model's vLLM (CPU, float32) and the load generator share them"
    )
    print(f"Machine: {machine}. Load average {start_load:.2f} at start.", flush=True)

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
                print(f"round {rnd} {p.name}: {CONCURRENCY * TOKENS / dt:.0f} tokens/s", flush=True)
        # the API process's CPU per request: through openloops, and while the direct rounds
        # ran (its controller and background tasks only)
        per_request = {k: v * 1000 / (rounds * CONCURRENCY) for k, v in api_cpu.items()}
        spread = {k: (CONCURRENCY * TOKENS / max(v), CONCURRENCY * TOKENS / min(v)) for k, v in times.items()}
        tps = {k: CONCURRENCY * TOKENS / statistics.median(v) for k, v in times.items()}
        paired = statistics.median(d / o for d, o in zip(times["direct"], times["openloops"], strict=True))

        # 4. time to first token, one request at a time
        asyncio.run(first_tokens([direct, via], 2))  # warm-up
        ttft = asyncio.run(first_tokens([direct, via], n_ttft))
        ms = {k: (pct(v, 0.5) * 1000, pct(v, 0.9) * 1000) for k, v in ttft.items()}
        added = ms["openloops"][0] - ms["direct"][0]
        end_load = load_average()

        print()
        print(f"Machine: {machine}. Load average {start_load:.2f} at start, {end_load:.2f} at the end.")
        print(f"Model openloops/tiny, LoRA rank 8; {rounds} rounds, {n_ttft} streamed requests per path.")
        print()
        print("| measurement | result |")
        print("|---|---|")
        print(f"| cold start: deploy -> ACTIVE (own vLLM server started, adapter loaded) | {cold:.1f} s |")
        print(
            f"| {CONCURRENCY} x {TOKENS} tokens straight to vLLM (`/v1/completions`, adapter) | {tps['direct']:.0f} tokens/s |"
        )
        print(
            f"| same through openloops (`base_url` `/completions`, checkpoint name) | {tps['openloops']:.0f} tokens/s "
            f"(ratio of medians {tps['openloops'] / tps['direct']:.2f}; median per-round ratio {paired:.2f}) |"
        )
        print(
            f"| single rounds, direct / through openloops | {spread['direct'][0]:.0f}-{spread['direct'][1]:.0f} / "
            f"{spread['openloops'][0]:.0f}-{spread['openloops'][1]:.0f} tokens/s |"
        )
        print(
            f"| CPU of the openloops process per request through it (during the direct rounds: its controller) "
            f"| {per_request['openloops']:.2f} ms ({per_request['direct']:.2f} ms) |"
        )
        print(
            f"| time to first token straight to vLLM, p50 / p90 ({TTFT_TOKENS}-token streams, one at a time) "
            f"| {ms['direct'][0]:.1f} / {ms['direct'][1]:.1f} ms |"
        )
        print(f"| same through openloops, p50 / p90 | {ms['openloops'][0]:.1f} / {ms['openloops'][1]:.1f} ms |")
        print(f"| added time to first token, p50 | {added:+.1f} ms |")
    finally:
        if server is not None:
            server.stop()
        stack.stop()


if __name__ == "__main__":
    main()
