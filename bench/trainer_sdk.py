"""Training step through openloops vs plain peft:
``python -m bench.trainer_sdk [--model tiny|bench] [--quick] [--readme]``.

Both sides train the same LoRA (rank 32 on attention, MLP and lm_head, AdamW) on a local model
(``--model``: ``bench``, hidden 256 and 4 layers, or ``tiny``, whose step is short enough that
the row measures openloops' own overhead) with the same batch (32 sequences x 256 tokens,
cross-entropy):

- **openloops**: the unmodified tinker SDK against a real ``openloops serve`` process (its
  controller starts a trainer worker subprocess); one step = ``forward_backward`` +
  ``optim_step``, submitted back to back (the SDK pipelines them) and waited for.
- **openloops through the Loops SDK**: the same step through the unmodified ``baseten-loops``
  SDK against a fresh ``openloops serve`` on the same stack, run by bench/loops_sdk.py as a
  script (bench/clients/loops_steps.py) in the Loops client venv (``.venvs/loops-client``,
  Python 3.12, from ``scripts/install test``); without the venv the row is skipped, with a note.
  A Loops run's adapter leaves out ``lm_head`` (openloops follows Loops there), so its losses
  after the first step differ slightly from the others'.
- **plain peft**: the same step in this process with transformers + peft + torch.optim.AdamW,
  no server, no queue, no serialization.
- **the trainer, in process**: the worker's own step (``TrainingModel.forward_backward`` on the
  protobuf request, then ``optim_step``) in a fresh process with the worker's allocator
  (jemalloc) and defaults, no server (bench.loss_memory's child): the reference for openloops'
  added time, which is the first row minus this one.

They run one after the other, never at the same time. Then the round trip of a small op: a
1 x 8-token ``forward`` through each SDK, against the same forward in process. Prints a markdown
table; ``--readme`` also writes it into bench/README.md (between the markers of ``--model``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.batch import BATCH, LR, RANK, SEQ, batch_tokens
from bench.live import trainer_pid
from bench.loops_sdk import loops_python, missing_venv_note, run_client
from bench.loss_memory import DEFAULT_MODE, MODES, run_mode
from bench.machine import machine_line
from bench.proc_memory import peak_rss_mib
from bench.readme_section import publish
from bench.stack import Stack, start_stack
from control_plane.catalog import CatalogModel, ModelCatalog
from control_plane.local_mode.models import prepare
from control_plane.scheduler.ports import free_port


def sdk_batch(tokens: np.ndarray) -> list[Any]:
    """The tinker datums of :func:`batch_tokens`' rows: cross-entropy on every next token."""
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=row[1:].tolist(), dtype="int64", shape=[SEQ]),
                "weights": types.TensorData(data=[1.0] * SEQ, dtype="float32", shape=[SEQ]),
            },
        )
        for row in tokens
    ]


SMALL_OP_TOKENS = 8
SMALL_OP_ROUNDS = 200


def bench_model(stack: Stack, kind: str) -> tuple[CatalogModel, int]:
    """The local model ``kind`` under the stack's data dir (built once), in its catalog, and
    its vocabulary size."""
    model = prepare(kind, stack.data_dir / "models", quiet=True)
    ModelCatalog([model]).dump(stack.data_dir / "catalog.yaml")
    vocab = int(json.loads((Path(model.source) / "config.json").read_text())["vocab_size"])
    return model, vocab


async def _make_key(stack: Stack) -> str:
    from control_plane.db.engine import Database
    from control_plane.services import identity

    db = Database(stack.database_url)
    try:
        async with db.transaction() as s:
            org = await identity.create_org(s, f"bench-{time.time_ns()}")
            user = await identity.create_user(s, org, "bench@localhost")
            key = await identity.create_api_key(s, user)
        return key.plaintext
    finally:
        await db.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def _worker_peak_rss_mib(stack: Stack, run_id: str) -> float | None:
    """VmHWM (peak resident set) of the run's trainer worker process (its deployment's), from /proc."""
    import redis

    from data_plane.wire.queue import run_state_key, text

    r = redis.Redis.from_url(stack.redis_url.replace("valkey://", "redis://", 1))
    dep = r.hget(run_state_key(run_id), "deployment_id")
    r.close()
    pid = trainer_pid(stack.redis_url, text(dep)) if dep else None
    return peak_rss_mib(pid) if pid else None


@dataclass
class SdkResult:
    step_times: list[float]
    first_step_s: float  # create_lora_training_client -> first completed step
    worker_peak_rss_mib: float | None
    small_op_times: list[float]  # 1 x 8-token forward round trips
    worker_step_times: list[float]  # the worker's own time in each measured step's ops (telemetry)
    sdk: str = "tinker SDK"  # the client, as the table names it
    version: str = ""  # the client's package and version, where the row names it

    @property
    def label(self) -> str:
        return f"openloops via {self.sdk}" + (f" ({self.version})" if self.version else "")


def worker_step_times(base: str, key: str, run_id: str, steps: int) -> list[float]:
    """``step_time_s`` of the run's last ``steps`` steps from its training telemetry: the
    worker's time executing the step's ops, without the queue, the API or the SDK."""
    import httpx

    deadline = time.monotonic() + 30
    while True:  # telemetry lands within about OPENLOOPS_TELEMETRY_BATCH_MS of each answer
        r = httpx.get(
            f"{base}/v1/loops/runs/{run_id}/training_metrics",
            headers={"Authorization": f"Bearer {key}"},
            params={"limit": 10000},
            timeout=30,
        )
        r.raise_for_status()
        got = [x["metrics"] for x in r.json()["steps"] if "step_time_s" in x["metrics"]]
        if len(got) >= steps or time.monotonic() > deadline:
            return [float(m["step_time_s"]) for m in got[-steps:]]
        time.sleep(0.5)


def small_datum(tokens: np.ndarray) -> Any:
    from tinker import types

    row = tokens[0, : SMALL_OP_TOKENS + 1]
    return types.Datum(
        model_input=types.ModelInput.from_ints(row[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=row[1:].tolist(), dtype="int64", shape=[SMALL_OP_TOKENS]),
            "weights": types.TensorData(data=[1.0] * SMALL_OP_TOKENS, dtype="float32", shape=[SMALL_OP_TOKENS]),
        },
    )


def quantile(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


@contextlib.contextmanager
def serve(stack: Stack, log_name: str) -> Iterator[tuple[str, str]]:
    """A fresh ``openloops serve`` process on the stack (its log in the stack's data dir) and a new
    API key with every scope (Tinker's and Loops'): yields the base URL and the key; stopping the
    server stops the trainer workers it started."""
    port = free_port()
    log = stack.data_dir / log_name
    env = {**os.environ, **stack.server_env(OPENLOOPS_PORT=str(port), OPENLOOPS_LOG_LEVEL="warning")}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane.cli.main", "serve"], env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/healthz", proc)
        yield base, asyncio.run(_make_key(stack))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_sdk(model: CatalogModel, stack: Stack, tokens: np.ndarray, steps: int, warmup: int) -> SdkResult:
    import tinker
    from tinker import types

    with serve(stack, "server.log") as (base, key):
        service = tinker.ServiceClient(base_url=base, api_key=key)
        t0 = time.perf_counter()
        first_step: float | None = None
        tc = service.create_lora_training_client(model.name, rank=RANK, seed=0).result()
        print(f"  training client ready in {time.perf_counter() - t0:.1f}s (worker start + base model load)")
        data = sdk_batch(tokens)
        times = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            fb = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=LR))
            loss = fb.result().metrics["loss:sum"]
            opt.result()
            dt = time.perf_counter() - t
            if first_step is None:
                first_step = time.perf_counter() - t0
            print(f"  openloops step {i}: {dt:.3f}s loss:sum={loss:.1f}{' (warm-up)' if i < warmup else ''}")
            if i >= warmup:
                times.append(dt)
        small = [small_datum(tokens)]
        small_times = []
        for i in range(SMALL_OP_ROUNDS + 3):
            t = time.perf_counter()
            tc.forward(small, "cross_entropy").result()
            if i >= 3:
                small_times.append(time.perf_counter() - t)
        rss = _worker_peak_rss_mib(stack, tc.model_id)
        worker = worker_step_times(base, key, tc.model_id, warmup + steps)[warmup:]
        service.close("success").result()
        assert first_step is not None
        return SdkResult(times, first_step, rss, small_times, worker)


def bench_loops(model: CatalogModel, stack: Stack, tokens: np.ndarray, steps: int, warmup: int) -> SdkResult | str:
    """The same step and small forward through the Loops SDK (bench/clients/loops_steps.py in the
    Loops client venv) against a fresh server on the stack; without the venv, why there is no row."""
    python = loops_python()
    if python is None:
        return missing_venv_note()
    with serve(stack, "server-loops.log") as (base, key):
        out = run_client(
            python,
            base_url=base,
            api_key=key,
            model=model.name,
            rows=tokens.tolist(),
            small=tokens[0, : SMALL_OP_TOKENS + 1].tolist(),
            rank=RANK,
            lr=LR,
            steps=steps,
            warmup=warmup,
            rounds=SMALL_OP_ROUNDS,
        )
        run_id = str(out["run_id"])
        # the SDK has no call that ends a run: the worker is still up (stopping the server stops it)
        rss = _worker_peak_rss_mib(stack, run_id)
        worker = worker_step_times(base, key, run_id, warmup + steps)[warmup:]
    return SdkResult(
        [float(x) for x in out["step_times"]],
        float(out["first_step_s"]),
        rss,
        [float(x) for x in out["small_op_times"]],
        worker,
        sdk="Loops SDK",
        version=str(out["sdk"]),
    )


def bench_peft(model: CatalogModel, tokens: np.ndarray, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32)
    cfg = LoraConfig(
        r=RANK,
        lora_alpha=32,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    )
    m = get_peft_model(base, cfg)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    x = torch.from_numpy(tokens[:, :-1])
    y = torch.from_numpy(tokens[:, 1:])
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        logits = m(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        print(f"  plain peft step {i}: {dt:.3f}s loss:sum={loss.item():.1f}{' (warm-up)' if i < warmup else ''}")
        if i >= warmup:
            times.append(dt)
    small = torch.from_numpy(tokens[:1, : SMALL_OP_TOKENS + 1])
    small_times = []
    with torch.no_grad():
        for i in range(SMALL_OP_ROUNDS + 3):
            t = time.perf_counter()
            logits = m(input_ids=small[:, :-1]).logits
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), small[0, 1:], reduction="none")
            if i >= 3:
                small_times.append(time.perf_counter() - t)
    return times, small_times


def _own_time(r: SdkResult) -> str:
    """openloops' own time per step of ``r``: its median step minus the worker's median time in the ops."""
    s_med, w_med = statistics.median(r.step_times), statistics.median(r.worker_step_times)
    return f"{1000 * (s_med - w_med):+.1f} ms ({100 * (s_med / w_med - 1):+.1f}% of the worker's {w_med:.3f} s)"


def _round_trip(r: SdkResult) -> str:
    so = r.small_op_times
    return f"p50 {1000 * quantile(so, 0.5):.1f} ms, p90 {1000 * quantile(so, 0.9):.1f} ms"


def _rss(r: SdkResult) -> str:
    return f"{r.worker_peak_rss_mib:,.0f} MiB" if r.worker_peak_rss_mib is not None else "n/a"


def table(
    kind: str,
    sdk: SdkResult,
    peft: list[float],
    peft_small: list[float],
    engine_s: float,
    loops: SdkResult | str | None = None,
) -> str:
    """The markdown of one run. ``loops``: the Loops-SDK path's result, or why it is missing."""
    s_med, p_med = statistics.median(sdk.step_times), statistics.median(peft)
    w_med = statistics.median(sdk.worker_step_times)
    tok = BATCH * SEQ
    ps = peft_small
    rows = [
        ("plain peft, in process", p_med),
        ("the trainer, in process (its allocator, no server)", engine_s),
        (sdk.label, s_med),
    ]
    lp = loops if isinstance(loops, SdkResult) else None
    if lp is not None:
        rows.append((lp.label, statistics.median(lp.step_times)))
    lines = [
        f"`--model {kind}`; {machine_line()}",
        "",
        "| path | median step (s) | tokens/s | vs plain peft |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {t:.3f} | {tok / t:,.0f} | {p_med / t:.2f} |" for name, t in rows),
        "",
    ]
    own = f"{_own_time(sdk)} through the {sdk.sdk}"
    trip = f"{_round_trip(sdk)} through the {sdk.sdk}"
    first = f"{sdk.first_step_s:.1f} s"
    rss = _rss(sdk)
    if lp is not None:
        own += f", {_own_time(lp)} through the {lp.sdk}"
        trip += f"; {_round_trip(lp)} through the {lp.sdk}"
        first += f" ({lp.sdk}: {lp.first_step_s:.1f} s)"
        rss += f" ({lp.sdk} run: {_rss(lp)})"
    text = (
        f"openloops' own time per step (the SDK's step minus the worker's time in the step's ops, from "
        f"the run's telemetry; SDK encode/decode, HTTP, API, Redis, polls): {own}. The worker's compute "
        f"against the trainer in a fresh process ({sdk.sdk} run): {1000 * (w_med - engine_s):+.1f} ms (the "
        f"same code: on this machine's shared cores that difference is noise, up to +-15% between runs). "
        f"A {SMALL_OP_TOKENS}-token `forward` round trip: {trip}; against {1000 * quantile(ps, 0.5):.1f} ms "
        f"in process ({len(sdk.small_op_times)} rounds). `create_lora_training_client` -> first step "
        f"{first}; trainer worker peak RSS {rss}."
    )
    if isinstance(loops, str):
        text += f" No Loops-SDK row: {loops}."
    lines.append(text)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "bench"), default="bench", help="the local model (default bench)")
    ap.add_argument("--quick", action="store_true", help="2 measured steps instead of 6")
    ap.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    args = ap.parse_args(argv)
    steps, warmup = (2, 1) if args.quick else (6, 2)
    print(machine_line())
    stack = start_stack()
    try:
        print(f"preparing the {args.model} model ...")
        model, vocab = bench_model(stack, args.model)
        tokens = batch_tokens(vocab)
        print(f"openloops (tinker SDK -> API -> Redis -> trainer worker), batch {BATCH}x{SEQ}, rank {RANK}")
        sdk = bench_sdk(model, stack, tokens, steps, warmup)
        print("openloops (Loops SDK in its venv -> API -> Redis -> trainer worker), the same batch")
        loops = bench_loops(model, stack, tokens, steps, warmup)
        if isinstance(loops, str):
            print(f"  skipped: {loops}")
        print("plain peft (in process)")
        peft, peft_small = bench_peft(model, tokens, steps, warmup)
        print("the trainer in process (fresh process, the worker's allocator)")
        engine = run_mode(model.source, MODES[DEFAULT_MODE], steps)
        print(f"  median step {engine['step_s']:.3f}s, losses {[round(x, 1) for x in engine['losses']]}")
    finally:
        stack.stop()
    publish(
        f"trainer_sdk.{args.model}",
        table(args.model, sdk, peft, peft_small, engine["step_s"], loops),
        readme=args.readme,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
