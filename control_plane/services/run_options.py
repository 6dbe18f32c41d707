"""Trainer options a run chooses when it is created, stored on its row and carried to its
worker by its seq-0 op (so that the runs a worker serves one after another each get their own).

Activation checkpointing (``auto`` | ``on`` | ``off``, data_plane/trainer/activation_checkpointing.py):
the Loops create body's ``activation_checkpointing`` field, or the Tinker SDK's
``user_metadata[ACTIVATION_CHECKPOINTING_KEY]`` (the only free-form field the unmodified SDK
sends on create). A run that chooses none gets the server's
``OPENLOOPS_TRAINER_ACTIVATION_CHECKPOINTING``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from control_plane.errors import InvalidInput
from data_plane.wire.op_bodies import ACTIVATION_CHECKPOINTING_MODES

ACTIVATION_CHECKPOINTING_FIELD = "activation_checkpointing"
# namespaced, so that it cannot collide with a client's own metadata keys
ACTIVATION_CHECKPOINTING_KEY = "openloops.activation_checkpointing"
METADATA_FIELD = f'user_metadata["{ACTIVATION_CHECKPOINTING_KEY}"]'  # what a refusal names
_ALLOWED = ", ".join(ACTIVATION_CHECKPOINTING_MODES)


def check_activation_checkpointing(value: object, field: str = ACTIVATION_CHECKPOINTING_FIELD) -> str | None:
    """``value`` when it is a mode, None when it is None; otherwise a 400 naming ``field``."""
    return None if value is None else _mode(value, field)


def activation_checkpointing_from_metadata(user_metadata: Mapping[str, Any] | None) -> str | None:
    """The mode a Tinker run chose in its ``user_metadata`` (None: the key is absent)."""
    if not user_metadata or ACTIVATION_CHECKPOINTING_KEY not in user_metadata:
        return None
    return _mode(user_metadata[ACTIVATION_CHECKPOINTING_KEY], METADATA_FIELD)


def _mode(value: object, field: str) -> str:
    if isinstance(value, str) and value in ACTIVATION_CHECKPOINTING_MODES:
        return value
    raise InvalidInput(f"{field} must be one of {_ALLOWED}, got {value!r}", field=field)
