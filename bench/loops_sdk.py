"""The Loops-SDK row of ``bench.trainer_sdk``: runs bench/clients/loops_steps.py (the unmodified
``baseten-loops`` SDK) in the Loops client venv against a live server and reads back its result.

The SDK needs Python 3.12, the benchmark runs on 3.11: the client is a separate process with the
venv's interpreter (``.venvs/loops-client``, built by ``scripts/install test``), configured only
through the SDK's environment variables (LOOPS_BASE_URL, BASETEN_API_KEY) and a JSON file with the
batch. Its progress goes to this process's stderr as it runs; its result is the last JSON object
on its stdout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV = REPO_ROOT / ".venvs" / "loops-client"
# scripts/install writes it as its last step: a venv without it is half-built
MARKER_NAME = ".openloops-requirements"
CLIENT = Path(__file__).resolve().parent / "clients" / "loops_steps.py"
INSTALL_HINT = "install it with `./scripts/install test` (it builds .venvs/loops-client, Python 3.12)"

# what the script's JSON must hold: lists of seconds, and the scalars beside them
TIME_LISTS = ("step_times", "small_op_times")
SCALARS = ("ready_s", "first_step_s")
KEYS = ("sdk", "run_id", *SCALARS, "warmup_step_times", *TIME_LISTS, "losses", "tokens")

# inherited variables that would configure the SDK or the venv's Python behind the benchmark's back
_DROPPED_PREFIXES = ("TINKER_", "LOOPS_", "BASETEN_")
_DROPPED = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"})


def loops_python(venv: Path = VENV) -> Path | None:
    """The Loops client venv's interpreter, or None when the venv is missing or half-built."""
    python = venv / "bin" / "python"
    return python if python.exists() and (venv / MARKER_NAME).exists() else None


def missing_venv_note(venv: Path = VENV) -> str:
    """Why the Loops row is missing, and how to get it."""
    where = venv.relative_to(REPO_ROOT) if venv.is_relative_to(REPO_ROOT) else venv
    return f"the Loops client venv ({where}) is not installed: {INSTALL_HINT}"


def client_env(base_url: str, api_key: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a Loops client script runs with (this benchmark's, and the tests' through
    tests/infra/loops_client.py): this process's, less what would configure the SDK or Python
    behind the caller's back, plus the SDK's settings, offline (a script needs no hub), then
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED and not k.startswith(_DROPPED_PREFIXES)}
    env.update(
        LOOPS_BASE_URL=base_url,
        BASETEN_API_KEY=api_key,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def last_json_object(stdout: str) -> dict[str, Any] | None:
    """The last line of ``stdout`` that is a JSON object."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def parse_result(stdout: str) -> dict[str, Any]:
    """The script's result from its stdout, checked: every key present, every time a finite
    positive number, at least one measured step and one small op. Raises ``ValueError``."""
    out = last_json_object(stdout)
    if out is None:
        raise ValueError(f"the Loops client printed no JSON object; stdout tail: {stdout[-2000:]!r}")
    missing = [k for k in KEYS if k not in out]
    if missing:
        raise ValueError(f"the Loops client's result lacks {missing}")
    for k in TIME_LISTS:
        xs = out[k]
        if not isinstance(xs, list) or not xs or not all(_positive(x) for x in xs):
            raise ValueError(f"the Loops client's {k} is not a non-empty list of positive seconds: {xs!r}")
    bad = [k for k in SCALARS if not _positive(out[k])]
    if bad:
        raise ValueError(f"the Loops client's {bad} are not positive seconds")
    return out


def run_client(
    python: Path,
    *,
    base_url: str,
    api_key: str,
    model: str,
    rows: Sequence[Sequence[int]],
    small: Sequence[int],
    rank: int,
    lr: float,
    steps: int,
    warmup: int,
    rounds: int,
    small_warmup: int = 3,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """Run the client script with ``python`` against ``base_url`` and return its checked result
    (:func:`parse_result`). A non-zero exit or a timeout raises ``RuntimeError``."""
    cfg = {
        "model": model,
        "rank": rank,
        "lr": lr,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "small_warmup": small_warmup,
        "rows": [[int(t) for t in row] for row in rows],
        "small": [int(t) for t in small],
    }
    with tempfile.TemporaryDirectory(prefix="bench-loops-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg))
        proc = subprocess.Popen(
            [str(python), str(CLIENT), str(path)],
            cwd=tmp,
            env=client_env(base_url, api_key),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,  # the result; progress and errors go straight to our stderr
            text=True,
            start_new_session=True,  # so that a timeout ends the script's children too
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"the Loops client timed out after {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the Loops client exited with {proc.returncode} (its stderr is above)")
    return parse_result(stdout)
