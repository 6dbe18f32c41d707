"""data_plane.models: the tiny/bench builder, the registry and the CLI (all offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_plane.models import MANIFEST_FILE, REGISTRY_FILE, build_tiny, read_manifest, scan
from data_plane.models.tokenizer import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny(d, "tiny", seed=0)
    return d


def test_build_is_deterministic(tiny_dir, tmp_path):
    other = tmp_path / "again"
    build_tiny(other, "tiny", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (tiny_dir / name).read_bytes() == (other / name).read_bytes(), name
    different = tmp_path / "seed1"
    build_tiny(different, "tiny", seed=1)
    assert (different / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_transformers_loads_and_runs_it(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["head_dim"] >= 32 and cfg["model_type"] == "qwen3"
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == read_manifest(tiny_dir).num_parameters
    # special tokens take ids 0..5; eos is <|im_end|>
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert len(tok) <= cfg["vocab_size"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode("<think>paris</think> is the capital")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>paris</think> is the capital"
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(ids) + 4)


def test_cli_build_list_and_registry(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    root = tmp_path / "models"
    proc = subprocess.run(
        [sys.executable, "-m", "data_plane.models", "build", "tiny", "--out", str(root / "tiny")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert manifest["name"] == "openloops/tiny" and manifest["path"] == str(root / "tiny")
    assert (root / "tiny" / MANIFEST_FILE).is_file()
    reg = yaml.safe_load((root / REGISTRY_FILE).read_text())
    assert [m["name"] for m in reg["models"]] == ["openloops/tiny"]
    assert reg["models"][0]["max_context_length"] == 4096
    assert reg["models"][0]["tokenizer_path"] == str(root / "tiny")

    proc = subprocess.run(
        [sys.executable, "-m", "data_plane.models", "list", "--dir", str(root)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0 and "openloops/tiny" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "data_plane.models", "list", "--dir", str(root), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert [m["name"] for m in json.loads(proc.stdout)] == ["openloops/tiny"]
    assert [m.name for m in scan(root)] == ["openloops/tiny"]

    bad = subprocess.run(
        [sys.executable, "-m", "data_plane.models", "build", "huge", "--out", str(root / "x")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_bench_preset_size(tmp_path):
    m = build_tiny(tmp_path / "bench", "bench")
    assert 5_000_000 < m.num_parameters < 10_000_000
    assert json.loads((tmp_path / "bench" / "config.json").read_text())["vocab_size"] == 8192


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        build_tiny(tmp_path / "x", "nope")
