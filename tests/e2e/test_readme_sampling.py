"""The README's sampling and RL examples run as written against the live server (only the base
URL, the key and the model name are substituted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.sampler.live import LiveStack

pytestmark = pytest.mark.timeout(900)
README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], re.S)


def run_block(code: str, stack: LiveStack) -> list[str]:
    code = (
        code.replace("http://127.0.0.1:8000", stack.base_url)
        .replace('"tml-..."', repr(stack.api_key))
        .replace('"openloops/tiny"', repr(stack.base_model))
    )
    printed: list[str] = []

    def _print(*args: object, **_: object) -> None:  # the example's output, not the server's logs
        printed.append(" ".join(str(a) for a in args))

    exec(compile(code, "README.md", "exec"), {"__name__": "readme", "print": _print})
    return printed


def test_readme_sampling_example(stack: LiveStack):
    blocks = python_blocks("## Sampling (vLLM)")
    assert len(blocks) == 2
    lines = run_block(blocks[0], stack)
    assert len(lines) == 3 and lines[0].split()[0] in ("stop", "length") and lines[2].startswith("[None, ")


def test_readme_rl_example(stack: LiveStack):
    lines = run_block(python_blocks("## Sampling (vLLM)")[1], stack)
    rewards = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert len(rewards) == 20 and all(0.0 <= r <= 1.0 for r in rewards)


def test_readme_serving_example(stack: LiveStack):
    """Train, deploy, chat and stream with the openai client, deactivate: as the README says."""
    (block,) = python_blocks("## Serving checkpoints (OpenAI-compatible)")
    lines = run_block(block, stack)
    assert len(lines) == 2, lines  # the chat answer, then the streamed text
