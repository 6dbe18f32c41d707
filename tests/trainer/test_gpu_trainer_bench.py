"""bench.gpu_trainer: the FLOP count on known shapes, and the whole trainer path on the CPU with
the tiny model (no vLLM: that is the slow tier's), checked on the numbers it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_trainer import (
    NO_CUDA_EXIT,
    Shape,
    flops_per_token,
    mfu,
    peak_tflops_for,
    percentile,
    render,
)
from bench.readme_section import write_section

REPO = Path(__file__).resolve().parents[2]
QWEN3_06B = Shape(hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8, head_dim=128, vocab=151936)


def test_flops_on_known_shapes():
    # one layer, hidden 2, 1 head of 2, MLP 4, vocabulary 3: q, k, v, o 2x2 each, gate, up, down 2x4
    s = Shape(hidden=2, intermediate=4, layers=1, heads=1, kv_heads=1, head_dim=2, vocab=3)
    assert s.base_matmul_params() == 4 * 4 + 3 * 8 + 2 * 3
    assert s.lora_params(1) == 4 * (2 + 2) + 3 * (2 + 4) + (2 + 3)
    assert flops_per_token(s, 1, 10) == 4 * 46 + 6 * 39 + 6 * 1 * 2 * 10
    # Qwen3-0.6B: 440 M non-embedding + 155.6 M output-projection weights
    assert QWEN3_06B.base_matmul_params() == 28 * 15_728_640 + 151_936 * 1024 == 595_984_384
    assert QWEN3_06B.lora_params(32) == 25_079_808
    assert flops_per_token(QWEN3_06B, 32, 2048) == pytest.approx(3.239e9, rel=1e-3)
    # MFU: 1e15 FLOPs in 2 s on one 1000-TFLOPS GPU is half its peak; on 2 GPUs a quarter
    assert mfu(1e15, 2.0, 1, 1000.0) == pytest.approx(0.5)
    assert mfu(1e15, 2.0, 2, 1000.0) == pytest.approx(0.25)
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA L4") == 121.0
    assert peak_tflops_for("Some Future GPU") is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_the_qwen3_preset_matches_the_real_architecture():
    from data_plane.models.presets import PRESETS
    from data_plane.models.tiny import qwen3_config

    cfg = qwen3_config(PRESETS["qwen3-0.6b"], eos_id=2, pad_id=5)
    assert Shape.from_config(cfg) == QWEN3_06B
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 1_000_000.0
    assert cfg["max_position_embeddings"] == 40960 and cfg["dtype"] == "bfloat16"


def test_bfloat16_writer_round_trips(tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from data_plane.models.tiny import save_bfloat16_safetensors

    a = np.random.default_rng(0).standard_normal((3, 5), dtype=np.float32)
    save_bfloat16_safetensors({"x": a, "y": np.ones(7, np.float32)}, tmp_path / "m.safetensors", {"format": "pt"})
    got = load_file(str(tmp_path / "m.safetensors"))
    assert got["x"].dtype == torch.bfloat16 and got["x"].shape == (3, 5)
    assert torch.equal(got["x"], torch.from_numpy(a).to(torch.bfloat16))  # round to nearest even, as torch
    assert torch.equal(got["y"], torch.ones(7, dtype=torch.bfloat16))


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_trainer", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def test_without_cuda_it_says_so_and_exits_2():
    proc = _run()
    assert proc.returncode == NO_CUDA_EXIT == 2
    assert "no CUDA device: this benchmark needs a GPU" in proc.stderr


def test_cpu_tiny_path_reports_consistent_numbers(tmp_path):
    proc = _run(
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--batches",
        "2x32,4x16",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--skip-sampler",
        "--peak-tflops",
        "1",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_trainer.json").read_text())
    assert res["preset"] == "tiny" and res["sampler"] is None
    [run] = res["trainer"]
    assert run["ranks"] == 1
    assert [(r["batch"], r["seq"]) for r in run["rows"]] == [(2, 32), (4, 16)]
    shape = Shape(**res["shape"])
    for row in run["rows"]:
        assert len(row["step_times_s"]) == 2 and all(t > 0 for t in row["step_times_s"])
        assert row["step_s"] > 0 and row["tokens"] == row["batch"] * row["seq"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_s"])
        assert row["flops_per_token"] == flops_per_token(shape, 32, row["seq"])
        assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens"] / (row["step_s"] * 1e12))
        assert len(row["loss_per_token"]) == 3
        assert all(7.0 < x < 8.5 for x in row["loss_per_token"])  # ~ln(2048) for a random model
    assert run["lora_params"] == shape.lora_params(32)
    table = (tmp_path / "gpu_trainer.md").read_text()
    assert "| 1 | 2 × 32 | 64 |" in table and "| 1 | 4 × 16 | 64 |" in table
    assert table.strip() in proc.stdout

    # the README section is replaced between its markers, the rest kept
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench.gpu_trainer: begin -->\nold\n<!-- bench.gpu_trainer: end -->\nafter\n")
    write_section("gpu_trainer", render(res), readme)
    text = readme.read_text()
    assert "old" not in text and "| 1 | 2 × 32 | 64 |" in text and text.endswith("end -->\nafter\n")
