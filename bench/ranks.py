"""One trainer rank vs two (the base model sharded with FSDP2 over gloo): ``python -m bench.ranks
[--quick] [--readme]``.

The trainer's own step (``TrainingModel.forward_backward`` + ``optim_step``, as in
``bench.loss_memory``) on the ``bench`` model, 32 x 256 tokens, rank 32, default logits mode,
jemalloc as trainers run: once as one process, once as two ranks under ``torchrun`` (each rank
loads the base model in turn and keeps its shard; each runs half of the batch, and rank 0 drives
the other as a worker does). Reports the median step time and every rank's peak RSS over the measured
steps and over its life, and the base model's weights each rank holds. On CPU, torchrun gives each rank one thread (``OMP_NUM_THREADS=1``),
and the single process runs with as many threads as ranks, for a fair comparison. Prints the
machine first and the results as markdown at the end; ``--readme`` also writes them into
bench/README.md (between the markers of ``ranks``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.batch import BATCH, RANK, SEQ
from bench.loss_memory import allocator_env, measure, new_model, vmhwm_mib
from bench.machine import load_average, machine_line
from bench.readme_section import publish

RANKS = (1, 2)


def child(model_dir: str, steps: int) -> dict | None:
    """This rank's part: rank 0 drives the steps as a worker does (every model call is a group
    call the other ranks follow); returns everyone's figures on rank 0."""
    import torch

    from data_plane.trainer import ranks as rank_setup
    from data_plane.trainer.group_calls import Group, follow
    from data_plane.trainer.model import load_base
    from data_plane.trainer.sharding import load_sharded_base

    torch.manual_seed(0)
    if rank_setup.world_from_env() == 1:
        base = load_base(model_dir, torch.device("cpu"), torch.float32)
        with tempfile.TemporaryDirectory() as store:
            out = measure(new_model(base, store, 0, "off"), steps)
        return {"ranks": [{**out, "life_peak_mib": vmhwm_mib(), "base_mib": _base_mib(base)}]}
    import torch.distributed as dist

    group = Group(rank_setup.init(1, "cpu"))
    base = load_sharded_base(model_dir, group.ranks, torch.float32)
    with tempfile.TemporaryDirectory() as store:
        m = new_model(base, store, 0, "off", group=group, create=group.is_leader)
        if group.is_leader:
            out = measure(m, steps)
            group.stop_followers()
        else:
            follow(m, group)
            out = {}
    out["life_peak_mib"] = vmhwm_mib()
    out["base_mib"] = _base_mib(base)
    everyone: list = [None] * group.ranks.world
    dist.all_gather_object(everyone, out, group=group.ranks.control)
    rank_setup.close()
    return {"ranks": everyone} if group.is_leader else None


def _base_mib(base: Any) -> float:
    """The base model's weights this rank holds (its shards)."""
    total = 0
    for p in base.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total / 2**20


def run(model_dir: str, ranks: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **allocator_env("jemalloc")})
    cmd = [sys.executable, "-m", "bench.ranks", "--child", model_dir, str(steps)]
    if ranks > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        env["OMP_NUM_THREADS"] = "1"
    else:
        env["OMP_NUM_THREADS"] = str(max(RANKS))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@dataclass(frozen=True)
class RanksReport:
    date: str
    quick: bool
    machine: str  # bench.machine's line at the start
    end_load: float
    steps: int  # measured
    results: dict[int, list[dict]]  # ranks -> every rank's figures (the step's on rank 0)


def render(report: RanksReport) -> str:
    """The README section's body: when, where, the table."""
    ref = report.results[1][0]
    rows = []
    for n, ranks in report.results.items():
        lead = ranks[0]
        life = " / ".join(f"{r['life_peak_mib']:,.0f}" for r in ranks)
        weights = " / ".join(f"{r.get('base_mib', 0):,.1f}" for r in ranks)
        rows.append(
            f"| {n} | {lead['step_s']:.3f} s | {lead['step_s'] / ref['step_s']:.0%} | {lead['steps_peak_mib']:,.0f} MiB "
            f"| {life} MiB | {weights} MiB |"
        )
    return "\n".join(
        [
            f"### Latest results ({report.date}{', --quick' if report.quick else ''})",
            "",
            f"{report.machine} at start, {report.end_load:.2f} at the end. {BATCH} × {SEQ} tokens, LoRA rank {RANK}, "
            f"{report.steps} measured steps; the losses agree within 1e-4.",
            "",
            "| ranks | step, median | vs 1 rank | peak RSS, steps (rank 0) | peak RSS per rank, whole life "
            "| base weights per rank |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.ranks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 measured steps")
    ap.add_argument("--readme", action="store_true", help="write the results into bench/README.md (its section)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "STEPS"), help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        out = child(args.child[0], int(args.child[1]))
        if out is not None:
            print(json.dumps(out), flush=True)
        return 0

    from control_plane.local_mode.models import prepare

    machine = machine_line()
    print(f"machine: {machine}", flush=True)
    steps = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as d:
        model = prepare("bench", Path(d), quiet=True)
        results = {n: run(model.source, n, steps) for n in RANKS}
    ref = results[1]["ranks"][0]
    for n, res in results.items():
        got = res["ranks"][0]["losses"]
        assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(ref["losses"], got)), (n, got, ref["losses"])
    report = RanksReport(
        date=datetime.date.today().isoformat(),
        quick=args.quick,
        machine=machine,
        end_load=load_average(),
        steps=steps,
        results={n: res["ranks"] for n, res in results.items()},
    )
    publish("ranks", render(report), readme=args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
