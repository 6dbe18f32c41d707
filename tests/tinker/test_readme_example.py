"""The README's tinker SDK example runs as written against a live server (only the URL, the
key and the model name are substituted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.infra.live_server import LiveServer

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_sdk_example_runs(live_server: LiveServer, tmp_path: Path) -> None:
    text = README.read_text()
    section = text.split("## Training with the tinker SDK", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README lost its SDK example"
    src = code.group(1)
    for old, new in (
        ('"http://127.0.0.1:8000"', repr(live_server.base_url)),
        ('"tml-..."', repr(live_server.api_key)),
        ('"openloops/tiny"', repr(live_server.model.name)),
    ):
        assert old in src, f"README example no longer contains {old}"
        src = src.replace(old, new)
    script = tmp_path / "example.py"
    script.write_text(src + "\nassert state.startswith('tinker://') and ':train:' in resumed.model_id\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [float(line.split()[1]) for line in proc.stdout.splitlines() if re.match(r"^\d+ ", line)]
    assert len(losses) == 10 and losses[-1] < losses[0], proc.stdout
