"""Static checks of what cannot be built here: the Dockerfiles and the import boundaries."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def resolved_from(path: Path) -> list[str]:
    ins = instructions(path)
    args = dict(re.match(r"(\w+)=(\S+)", rest).groups() for op, rest in ins if op == "ARG" and "=" in rest)  # type: ignore[union-attr]
    froms = []
    for op, rest in ins:
        if op == "FROM":
            image = rest.split()[0]
            froms.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return froms


@pytest.mark.parametrize("name", ["control-plane", "trainer", "sampler"])
def test_dockerfiles_pin_their_bases_and_copy_existing_paths(name: str) -> None:
    path = DOCKER / f"{name}.Dockerfile"
    for image in resolved_from(path):
        if image == "build":
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", image
    ignored = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for op, rest in instructions(path):
        if op == "COPY" and "--from" not in rest and "--mount" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                if src.endswith("*"):
                    continue  # optional (README.md*)
                assert (ROOT / src).exists(), src
                assert not any(fnmatch.fnmatch(src, pat.lstrip("/")) for pat in ignored), (
                    f"{src} is excluded by .dockerignore"
                )


def test_dockerfile_specifics() -> None:
    sampler = (DOCKER / "sampler.Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v\d+\.\d+\.\d+$", sampler, re.M)
    assert "--no-deps ." in sampler and "data_plane.sampler" in sampler
    trainer = (DOCKER / "trainer.Dockerfile").read_text()
    assert '".[trainer]"' in trainer and "data_plane.trainer" in trainer
    control = (DOCKER / "control-plane.Dockerfile").read_text()
    assert "torch" not in control.replace("# No torch/vLLM in here.", "")
    assert "USER 10001" in control  # matches the chart's runAsUser
    for module in ("data_plane/sampler/__main__.py", "data_plane/trainer/__main__.py"):
        assert (ROOT / module).exists(), module


def test_only_the_backend_imports_kubernetes() -> None:
    offenders = []
    for py in (ROOT / "control_plane").rglob("*.py"):
        if py.relative_to(ROOT).as_posix() == "control_plane/scheduler/kubernetes.py":
            continue
        tree = ast.parse(py.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(n == "kubernetes" or n.startswith("kubernetes.") for n in names):
                offenders.append(str(py.relative_to(ROOT)))
    assert offenders == []
