"""Checkpoint path formats.

- Tinker: ``tinker://{run_id}/{kind}/{name}`` (kind ``weights`` | ``sampler_weights`` |
  ``external_weights``: a PEFT adapter exported for download, by ``save_weights_external``);
  run ids contain ``:`` but never ``/``, names never contain ``/``.
- Loops: ``bt://loops:{run_id}/{kind}/{name}`` (same kinds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("weights", "sampler_weights", "external_weights")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")


class PathError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    run_id: str
    kind: str
    name: str

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"

    @property
    def loops_path(self) -> str:
        return f"bt://loops:{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        """The Tinker ``checkpoint_id`` (``{kind}/{name}``)."""
        return f"{self.kind}/{self.name}"


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise PathError(
            f"invalid checkpoint name {name!r}: use 1-200 characters from letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    return name


def parse_checkpoint_path(path: str) -> CheckpointRef:
    if path.startswith("tinker://"):
        rest = path[len("tinker://") :]
    elif path.startswith("bt://loops:"):
        rest = path[len("bt://loops:") :]
    else:
        raise PathError(
            f"malformed checkpoint path {path!r}: expected tinker://<run_id>/<kind>/<name> "
            "or bt://loops:<run_id>/<kind>/<name>"
        )
    parts = rest.split("/")
    if len(parts) != 3 or not all(parts):
        raise PathError(f"malformed checkpoint path {path!r}: expected exactly <run_id>/<kind>/<name>")
    run_id, kind, name = parts
    if kind not in KINDS:
        raise PathError(f"malformed checkpoint path {path!r}: kind must be one of {', '.join(KINDS)}")
    validate_name(name)
    return CheckpointRef(run_id, kind, name)
