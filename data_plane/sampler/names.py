"""LoRA adapter names as the sampler understands them. Pure Python (the control plane uses it).

The LoRA name the control plane sends to vLLM (the OpenAI ``model`` field) *is* the
object-store key prefix of a PEFT adapter checkpoint, relative to the sampler's store, e.g.
``ckpt/org_1/run_abc:train:0/sampler_weights/step-10``. Under that prefix the store holds
``adapter_config.json`` and ``adapter_model.safetensors`` (what ``save_pretrained`` writes).

Nothing else is needed to resolve it, and nothing a client controls reaches the sampler: the
control plane derives the name from its own checkpoint row. The sampler still validates every
name so that it can only ever address keys inside its store (and, optionally, under a set of
allowed prefixes): no absolute paths, no ``.``/``..`` segments, no backslashes, no empty
segments, a conservative character set.
"""

from __future__ import annotations

import hashlib
import re

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)

MAX_NAME_LEN = 512
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:=@+\-]*$")


class InvalidAdapterName(ValueError):
    pass


def validate_adapter_name(name: str, allowed_prefixes: list[str] | tuple[str, ...] = ()) -> str:
    """Return ``name`` (the store key prefix) or raise :class:`InvalidAdapterName`."""
    if not isinstance(name, str) or not name:
        raise InvalidAdapterName("adapter name must be a non-empty string")
    if len(name) > MAX_NAME_LEN:
        raise InvalidAdapterName(f"adapter name longer than {MAX_NAME_LEN} characters")
    if name.startswith("/") or name.endswith("/") or "\\" in name or "//" in name:
        raise InvalidAdapterName(f"adapter name {name!r} is not a relative store key prefix")
    for seg in name.split("/"):
        if seg in (".", "..") or not _SEGMENT_RE.match(seg):
            raise InvalidAdapterName(
                f"adapter name {name!r}: segment {seg!r} is not allowed (use letters, digits and "
                "'._:=@+-', not starting with '.' or '-')"
            )
    if allowed_prefixes and not any(name.startswith(p) for p in allowed_prefixes):
        raise InvalidAdapterName(f"adapter name {name!r} is outside this sampler's adapter prefixes")
    return name


def adapter_name_for_prefix(storage_prefix: str) -> str:
    """The LoRA name the control plane sends for a checkpoint stored under ``storage_prefix``."""
    return validate_adapter_name(storage_prefix.strip("/"))


def cache_dir_name(name: str) -> str:
    """A filesystem-safe, collision-free local directory name for an adapter name."""
    return hashlib.sha256(name.encode()).hexdigest()[:40]
