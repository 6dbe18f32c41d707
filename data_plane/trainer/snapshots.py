"""Run snapshots: everything a new trainer worker needs to continue a run exactly.

A snapshot is taken between two ops. It holds the live LoRA weights, their values right after
seq 0 (``init_trainer`` returns to them), the gradients accumulated since the last
``optim_step`` with their normalization counters, the AdamW state, the optimizer step count,
the torch RNG states, the LoRA settings, the run's activation checkpointing mode (its seq-0
choice: seq 0 is not replayed once a snapshot covers it), the run's ``max_seq_len`` and
``next_seq``: the first op it does *not* cover. A worker that restores it and then executes
the ops ``next_seq, next_seq + 1, ...`` from the run's op log reaches the state an
uninterrupted worker has, bit for bit (same code, same device).

Layout in the object store under the run's snapshot prefix (given by the control plane):

| key | what |
|---|---|
| ``{prefix}/{next_seq:012d}-{token}/state.safetensors`` | every tensor; the JSON facts in the safetensors header (``openloops`` key) |
| ``{prefix}/manifest.json`` | :class:`Manifest`: which state file is current (written last) |

The manifest is one object written in one PUT, so a snapshot becomes visible atomically: a
crash while the state file uploads leaves the previous manifest (and its files) in place.
Older state files are deleted only after the new manifest is written.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from data_plane.storage.base import ObjectNotFound, ObjectStore
from data_plane.trainer import checkpoint as ckpt
from data_plane.trainer.model import LoraSettings
from data_plane.wire.op_bodies import ACTIVATION_CHECKPOINTING_MODES

if TYPE_CHECKING:
    from data_plane.trainer.training import TrainingModel

FORMAT = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.safetensors"
_PARAM, _INITIAL, _GRAD, _OPT, _RNG = "param::", "initial::", "grad::", "opt::", "rng::"


class SnapshotError(RuntimeError):
    """A snapshot exists but cannot be used (corrupt, another format, another run)."""


@dataclass(frozen=True, slots=True)
class Manifest:
    run_id: str
    next_seq: int
    key: str  # the state file
    size_bytes: int
    optim_steps: int
    created_at: float
    format: int = FORMAT

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        d = json.loads(raw)
        if int(d.get("format", 0)) > FORMAT:
            raise SnapshotError(f"snapshot format {d.get('format')} is newer than this worker's ({FORMAT})")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(slots=True)
class RunSnapshot:
    """A run's training state at ``next_seq`` (CPU copies, safe to serialise in a thread)."""

    run_id: str
    next_seq: int
    max_seq_len: int
    # None: seq 0 failed or never created the model; seq0_error then says why
    lora: dict[str, Any] | None
    optim_steps: int
    accumulation: tuple[str | None, int]
    seq0_error: tuple[str, str] | None
    tensors: dict[str, torch.Tensor]
    # the run's own activation checkpointing mode (None: it chose none, the worker's default
    # applies; snapshots written before the option existed have none either)
    activation_checkpointing: str | None = None

    def facts(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "next_seq": self.next_seq,
            "max_seq_len": self.max_seq_len,
            "lora": self.lora,
            "optim_steps": self.optim_steps,
            "accumulation": list(self.accumulation),
            "seq0_error": list(self.seq0_error) if self.seq0_error else None,
            "activation_checkpointing": self.activation_checkpointing,
        }

    def encode(self) -> bytes:
        return st_save(self.tensors, metadata={"openloops": json.dumps(self.facts(), sort_keys=True)})

    @classmethod
    def decode(cls, raw: bytes) -> RunSnapshot:
        try:
            tensors = st_load(raw)
            header = _header(raw)
        except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unusable
            raise SnapshotError(f"snapshot state file is unreadable: {type(exc).__name__}: {exc}") from None
        try:
            d = json.loads(header["openloops"])
            mode, count = d["accumulation"]
            seq0 = d.get("seq0_error")
            return cls(
                run_id=str(d["run_id"]),
                next_seq=int(d["next_seq"]),
                max_seq_len=int(d["max_seq_len"]),
                lora=d.get("lora"),
                optim_steps=int(d["optim_steps"]),
                accumulation=(mode, int(count)),
                seq0_error=(str(seq0[0]), str(seq0[1])) if seq0 else None,
                tensors=tensors,
                activation_checkpointing=_checkpointing_mode(d.get("activation_checkpointing")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot state file has bad facts: {type(exc).__name__}: {exc}") from None


def _checkpointing_mode(value: Any) -> str | None:
    """A snapshot's activation checkpointing mode, checked (ValueError: not a mode)."""
    if value is not None and value not in ACTIVATION_CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing {value!r} is not one of {ACTIVATION_CHECKPOINTING_MODES}")
    return value


def _header(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob."""
    n = int.from_bytes(raw[:8], "little")
    return dict(json.loads(raw[8 : 8 + n]).get("__metadata__") or {})


# ---- capture / restore (between ops, in the worker's main thread) ---------------------------


def capture(model: TrainingModel, run_id: str, next_seq: int, seq0_error: tuple[str, str] | None = None) -> RunSnapshot:
    """Copy the run's state off the live model (CPU tensors the model never touches again)."""
    eng = model.engine
    tensors: dict[str, torch.Tensor] = {_RNG + "cpu": torch.random.get_rng_state().clone()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{_RNG}cuda{i}"] = st.clone()
    if eng is None or model.lora is None:
        return RunSnapshot(run_id, next_seq, model.max_seq_len, None, 0, (None, 0), seq0_error, tensors)
    for name, p in eng.named_params:
        tensors[_PARAM + name] = p.detach().to("cpu", copy=True)
        if p.grad is not None:
            tensors[_GRAD + name] = p.grad.detach().to("cpu", copy=True)
    for name, t in (model.initial or {}).items():
        tensors[_INITIAL + name] = t  # never modified in place (init_trainer copies from it)
    on_cpu = model.device.type == "cpu"  # there optimizer_state returns the live tensors (views)
    for k, t in ckpt.optimizer_state(eng.optimizer, eng.named_params).items():
        tensors[_OPT + k] = t.clone() if on_cpu else t
    return RunSnapshot(
        run_id=run_id,
        next_seq=next_seq,
        max_seq_len=model.max_seq_len,
        lora=model.lora.to_dict(),
        optim_steps=eng.optimizer_steps,
        accumulation=eng.accumulation,
        seq0_error=seq0_error,
        tensors=tensors,
        activation_checkpointing=model.run_checkpointing,
    )


def restore(model: TrainingModel, snap: RunSnapshot) -> None:
    """Put ``snap`` into ``model`` (which has no adapter yet): adapter and activation
    checkpointing mode, initial values, gradients, optimizer, step count, RNG. Raises
    :class:`SnapshotError` when it does not fit."""
    t = snap.tensors
    if snap.lora is not None:
        model.attach_for_restore(LoraSettings.from_dict(snap.lora), snap.activation_checkpointing)
        eng = model.engine
        assert eng is not None
        try:
            _fill(eng.named_params, t)
            initial = {n: t[_INITIAL + n] for n, _ in eng.named_params if _INITIAL + n in t}
            if len(initial) != len(eng.named_params):
                raise SnapshotError("snapshot lacks the adapter's initial values")
            model.initial = {n: v.clone() for n, v in initial.items()}
            eng.clear_grads()
            for name, p in eng.named_params:
                g = t.get(_GRAD + name)
                if g is not None:
                    p.grad = g.to(p.device, p.dtype).clone()
            mode, count = snap.accumulation
            eng.set_accumulation(mode, count)
            opt = {k[len(_OPT) :]: v for k, v in t.items() if k.startswith(_OPT)}
            eng.reset_optimizer()
            if opt:
                ckpt.load_optimizer_into(eng.optimizer, eng.named_params, opt)
            eng.optimizer_steps = snap.optim_steps
        except Exception as exc:
            model.detach()
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"snapshot does not fit this model: {type(exc).__name__}: {exc}") from None
    torch.random.set_rng_state(t[_RNG + "cpu"])
    if torch.cuda.is_available():
        states = [t[f"{_RNG}cuda{i}"] for i in range(torch.cuda.device_count()) if f"{_RNG}cuda{i}" in t]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _fill(named: list[tuple[str, torch.nn.Parameter]], t: dict[str, torch.Tensor]) -> None:
    """Copy the snapshot's adapter weights in, after checking every name and shape."""
    for name, p in named:
        v = t.get(_PARAM + name)
        if v is None:
            raise SnapshotError(f"snapshot weights lack {name}")
        if tuple(v.shape) != tuple(p.shape):
            raise SnapshotError(f"snapshot weights {name} have shape {tuple(v.shape)}, the model {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in named:
            p.copy_(t[_PARAM + name].to(p.device, p.dtype))


# ---- the object store -------------------------------------------------------------------------


class Superseded(SnapshotError):
    """Another worker owns the run now, or already wrote a later snapshot: nothing committed."""


def write(store: ObjectStore, prefix: str, snap: RunSnapshot, owns: Callable[[], bool] = lambda: True) -> Manifest:
    """Upload ``snap``, then make it current (the manifest PUT), then delete older state files.

    ``owns`` is asked just before the commit: a worker that lost the run to a newer one (a
    replaced pod still draining) must not move the manifest. A manifest already further along
    is never moved back either (both raise :class:`Superseded`)."""
    raw = snap.encode()
    key = f"{prefix.rstrip('/')}/{snap.next_seq:012d}-{secrets.token_hex(4)}/{STATE_FILE}"
    store.put_bytes(key, raw)
    current = read_manifest(store, prefix)
    if not owns() or (current is not None and current.next_seq > snap.next_seq):
        store.delete_prefix(key.rsplit("/", 1)[0] + "/")
        raise Superseded(
            f"run {snap.run_id}: a newer worker or snapshot took over; snapshot at seq {snap.next_seq} dropped"
        )
    manifest = Manifest(snap.run_id, snap.next_seq, key, len(raw), snap.optim_steps, time.time())
    store.put_bytes(f"{prefix.rstrip('/')}/{MANIFEST}", manifest.encode())
    keep = key.rsplit("/", 1)[0] + "/"
    for info in store.list(prefix.rstrip("/") + "/"):
        if info.key.endswith("/" + STATE_FILE) and not info.key.startswith(keep):
            store.delete_prefix(info.key.rsplit("/", 1)[0] + "/")
    return manifest


def read_manifest(store: ObjectStore, prefix: str) -> Manifest | None:
    """The current snapshot's manifest (None when the run has none yet)."""
    try:
        raw = store.get_bytes(f"{prefix.rstrip('/')}/{MANIFEST}")
    except ObjectNotFound:
        return None
    try:
        return Manifest.decode(raw)
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot manifest is unreadable: {type(exc).__name__}: {exc}") from None


def read(store: ObjectStore, prefix: str, run_id: str) -> RunSnapshot | None:
    """The run's current snapshot (None when it has none)."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        return None
    if manifest.run_id != run_id:
        raise SnapshotError(f"the snapshot under {prefix!r} belongs to run {manifest.run_id!r}, not {run_id!r}")
    try:
        raw = store.get_bytes(manifest.key)
    except ObjectNotFound:
        raise SnapshotError(f"snapshot state file {manifest.key!r} named by the manifest is missing") from None
    snap = RunSnapshot.decode(raw)
    if snap.next_seq != manifest.next_seq or snap.run_id != run_id:
        raise SnapshotError("snapshot state file does not match its manifest")
    return snap
