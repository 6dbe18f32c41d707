"""Check a PEFT LoRA adapter directory without loading it: ``adapter_config.json`` as JSON and
``adapter_model.safetensors`` by its header (the format is an 8-byte little-endian header length,
a JSON header naming every tensor's dtype, shape and byte range, then the raw bytes), so the
control plane can vet an import without torch or peft.

An adapter is accepted when the trainer could load it as a run's starting point and vLLM could
serve it: LoRA (no DoRA, no bias, no per-module rank or alpha, no extra saved modules), and
target modules that are whole groups of what the trainer trains (attention: q/k/v/o_proj,
MLP: gate/up/down_proj, unembedding: lm_head), every one of them in every layer, with an A and
a B matrix of the declared rank. Given the base model's ``config.json``, the layer count and each
matrix's shape are checked against it as well.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 20
MAX_TENSORS = 100_000

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
GROUPS = {"train_attn": ATTN_MODULES, "train_mlp": MLP_MODULES, "train_unembed": UNEMBED_MODULES}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# a saved LoRA tensor: PEFT strips the adapter name ("...q_proj.lora_A.weight")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AdapterError(ValueError):
    """The adapter cannot be imported; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    rank: int
    alpha: float
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    tensors: int
    config: dict[str, Any]  # adapter_config.json as read

    def lora_config(self) -> dict[str, Any]:
        """The LoRA settings as trainer checkpoints record them (``LoraSettings.to_dict``)."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "seed": 0,
            "train_attn": self.train_attn,
            "train_mlp": self.train_mlp,
            "train_unembed": self.train_unembed,
        }


@dataclass(frozen=True, slots=True)
class BaseShapes:
    """What a Llama/Qwen-style base model's ``config.json`` says about its linear layers."""

    layers: int
    shapes: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> BaseShapes | None:
        """None when the config lacks what the shapes follow from (an unknown architecture)."""
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            inter = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
            layers = int(cfg["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            return None
        q, k = heads * head_dim, kv * head_dim
        return cls(
            layers,
            {
                "q_proj": (q, hidden),
                "k_proj": (k, hidden),
                "v_proj": (k, hidden),
                "o_proj": (hidden, q),
                "gate_proj": (inter, hidden),
                "up_proj": (inter, hidden),
                "down_proj": (hidden, inter),
                "lm_head": (vocab, hidden),
            },
        )


def read_config(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE} must be a JSON object")
    return cfg


def _check_config(cfg: dict[str, Any], max_rank: int) -> tuple[int, float, set[str]]:
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{CONFIG_FILE}: peft_type is {peft_type!r}; only LORA adapters can be imported")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= max_rank:
        raise AdapterError(f"{CONFIG_FILE}: r (the LoRA rank) must be an integer in [1, {max_rank}], got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (0 < alpha < math.inf):
        raise AdapterError(f"{CONFIG_FILE}: lora_alpha must be a positive number, got {alpha!r}")
    unsupported = [
        ("use_dora", cfg.get("use_dora"), "DoRA"),
        ("use_rslora", cfg.get("use_rslora"), "rank-stabilized scaling"),
        ("rank_pattern", cfg.get("rank_pattern"), "per-module ranks"),
        ("alpha_pattern", cfg.get("alpha_pattern"), "per-module alphas"),
        ("modules_to_save", cfg.get("modules_to_save"), "fully trained extra modules"),
        ("layers_to_transform", cfg.get("layers_to_transform"), "LoRA on some layers only"),
        ("fan_in_fan_out", cfg.get("fan_in_fan_out"), "transposed (Conv1D) weights"),
    ]
    for key, value, what in unsupported:
        if value:
            raise AdapterError(f"{CONFIG_FILE}: {key} is set ({what}), which this server cannot train or serve")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{CONFIG_FILE}: bias is {cfg.get('bias')!r}; only bias 'none' is supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(
            f"{CONFIG_FILE}: target_modules is a regular expression ({targets!r}); list the module names instead"
        )
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{CONFIG_FILE}: target_modules must be a non-empty list of module names")
    names = {t.rsplit(".", 1)[-1] for t in targets}
    known = {m for group in GROUPS.values() for m in group}
    if unknown := sorted(names - known):
        raise AdapterError(
            f"{CONFIG_FILE}: target_modules {unknown} cannot be trained here; supported: {', '.join(sorted(known))}"
        )
    for flag, group in GROUPS.items():
        part = names & set(group)
        if part and part != set(group):
            raise AdapterError(
                f"{CONFIG_FILE}: target_modules has {sorted(part)} but not {sorted(set(group) - part)}; this server "
                f"trains {', '.join(group)} together ({flag})"
            )
    return r, float(alpha), names


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensors of a ``.safetensors`` file (name -> {dtype, shape, data_offsets}) and the size
    of its data section, checked to describe the file exactly."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterError(f"{WEIGHTS_FILE} is too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file (header length {n} of a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{WEIGHTS_FILE} has an unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE} has a safetensors header that is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise AdapterError(f"{WEIGHTS_FILE} holds more than {MAX_TENSORS} tensors")
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, t in header.items():
        if not isinstance(t, dict):
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} is {dtype}; LoRA weights must be one of {', '.join(DTYPE_BYTES)}"
            )
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} has a malformed shape or data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} ({dtype} {shape}) has byte range {offsets}, which does not fit "
                f"its shape or the file's {data_len} data bytes (truncated or corrupt file?)"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} overlaps another or leaves a gap (corrupt file)")
        pos = end
    if pos != data_len:
        raise AdapterError(f"{WEIGHTS_FILE}: {data_len - pos} bytes after the last tensor (corrupt file)")
    return header, data_len


def inspect_adapter(
    config_bytes: bytes, weights_path: Path, *, max_rank: int, base: BaseShapes | None = None
) -> AdapterInfo:
    """Check an adapter (see the module docstring); raises :class:`AdapterError`."""
    cfg = read_config(config_bytes)
    rank, alpha, names = _check_config(cfg, max_rank)
    header, _ = read_safetensors_header(weights_path)
    if not header:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors")
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, t in header.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA matrix as PEFT saves them "
                "(base_model.model.<module>.lora_A.weight / lora_B.weight)"
            )
        module, ab = m.group("module"), m.group("ab")
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in names:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {key!r} is on {leaf}, which target_modules does not list")
        shape = t["shape"]
        if len(shape) != 2:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {key!r} has shape {shape}; LoRA matrices are 2-D")
        pairs.setdefault(module, {})[ab] = shape
    layers: dict[str, set[int]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{WEIGHTS_FILE}: {module} has no {missing} matrix")
        (a_rank, a_in), (b_out, b_rank) = ab["A"], ab["B"]
        if a_rank != rank or b_rank != rank:
            raise AdapterError(
                f"{WEIGHTS_FILE}: {module} has lora_A {ab['A']} and lora_B {ab['B']}, not rank r={rank} "
                f"as {CONFIG_FILE} says"
            )
        leaf = module.rsplit(".", 1)[-1]
        if base is not None and (b_out, a_in) != base.shapes[leaf]:
            raise AdapterError(
                f"{WEIGHTS_FILE}: {module} adapts a {b_out}x{a_in} matrix, but the base model's {leaf} is "
                f"{base.shapes[leaf][0]}x{base.shapes[leaf][1]} (an adapter for another model?)"
            )
        lm = _LAYER.search(module)
        if lm is not None:
            layers.setdefault(leaf, set()).add(int(lm.group(1)))
        elif leaf != "lm_head":
            raise AdapterError(f"{WEIGHTS_FILE}: {module} is not in a numbered decoder layer")
    for leaf in sorted(names):
        if leaf == "lm_head":
            if not any(mod.rsplit(".", 1)[-1] == "lm_head" for mod in pairs):
                raise AdapterError(f"{WEIGHTS_FILE}: target_modules lists lm_head but it has no lm_head matrices")
            continue
        got = layers.get(leaf, set())
        want = set(range(base.layers)) if base is not None else set(range(max(got, default=-1) + 1))
        if got != want:
            raise AdapterError(
                f"{WEIGHTS_FILE}: {leaf} has LoRA matrices in {len(got)} layers, expected every one of "
                f"{len(want) if want else 'the'} layers (missing e.g. {sorted(want - got)[:3] or 'all'})"
            )
    counts = {len(v) for v in layers.values()}
    if len(counts) > 1:
        raise AdapterError(f"{WEIGHTS_FILE}: target modules cover different numbers of layers")
    return AdapterInfo(
        rank=rank,
        alpha=float(alpha),
        train_attn=bool(names & set(ATTN_MODULES)),
        train_mlp=bool(names & set(MLP_MODULES)),
        train_unembed="lm_head" in names,
        tensors=len(header),
        config=cfg,
    )


def normalized_config(cfg: dict[str, Any], base_model: str) -> bytes:
    """``adapter_config.json`` as stored: the given one, naming the catalog's base model and
    marked for inference (what the trainer writes for its own adapters)."""
    out = dict(cfg)
    out["base_model_name_or_path"] = base_model
    out["inference_mode"] = True
    return (json.dumps(out, indent=2, sort_keys=True) + "\n").encode()
