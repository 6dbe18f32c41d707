"""Helpers for the in-process trainer tests of the Loops dialect, the preference losses and the
run lifecycle (building models on the tiny base, Loops requests, strict JSON decoding)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data_plane.storage.local import LocalDirStore
from data_plane.trainer.model import load_base
from data_plane.trainer.training import TrainingModel
from data_plane.wire import op_bodies
from data_plane.wire import tinker_wire_pb2 as pb
from tests.trainer.conftest import dense


def new_model(
    tiny_model: Path,
    store_dir: Path,
    *,
    microbatch_tokens: int = 4096,
    rank: int = 4,
    seed: int = 3,
    create: bool = True,
    default_checkpointing: str = "off",
    checkpointing: str | None = None,
    **lora,
) -> TrainingModel:
    """A model on the tiny base; ``default_checkpointing`` is the worker's activation
    checkpointing default, ``checkpointing`` the run's own choice in its create op."""
    base = load_base(str(tiny_model), torch.device("cpu"), torch.float32)
    m = TrainingModel(
        model_id="s:train:0",
        base_model_name="openloops/tiny",
        base=base,
        device=torch.device("cpu"),
        store=LocalDirStore(store_dir),
        max_seq_len=512,
        microbatch_tokens=microbatch_tokens,
        activation_checkpointing=default_checkpointing,
    )
    if create:
        m.create(
            op_bodies.CreateBody(
                op_bodies.LoraSpec(rank=rank, seed=seed, **lora), activation_checkpointing=checkpointing
            )
        )
    return m


def loops_request(
    datums: list[dict], loss_fn: str = "cross_entropy", forward_only: bool = False, config: dict | None = None
) -> bytes:
    """What the control plane builds from the Loops SDK's JSON: config numbers in
    ``loss_fn_config_v2`` only (options included)."""
    req = pb.ForwardBackwardRequest(model_id="m", loss_fn=loss_fn, forward_only=forward_only)
    for k, v in (config or {}).items():
        req.loss_fn_config_v2[k].number = float(v)
    for d in datums:
        msg = req.data.add()
        msg.model_input.add().encoded_text.tokens = np.asarray(d["tokens"], "<i4").tobytes()
        for name, value in d.items():
            if name != "tokens":
                msg.loss_fn_inputs[name].CopyFrom(dense(np.asarray(value)))
    return req.SerializeToString()


def _no_constants(name: str):
    raise AssertionError(f"invalid JSON constant {name} in the answer")


def strict_json(raw: bytes) -> dict:
    """Parse the answer, refusing the non-standard NaN / Infinity tokens."""
    return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)


def loops_run(m: TrainingModel, datums: list[dict], **kw) -> dict:
    return strict_json(m.loops_forward_backward(loops_request(datums, **kw)))


def to_numpy(td: dict) -> np.ndarray:
    """A TensorData dict back to numpy (null -> NaN), as the SDK does."""
    if td["dtype"] == "float32":
        data = [np.nan if x is None else x for x in td["data"]]
        return np.asarray(data, dtype=np.float32).reshape(td["shape"])
    return np.asarray(td["data"], dtype=np.int64).reshape(td["shape"])


def grads(m: TrainingModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.engine.named_params if p.grad is not None}


def params(m: TrainingModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.engine.named_params}


def step(m: TrainingModel, **adam) -> dict:
    return m.optim_step(op_bodies.OptimStepBody(op_bodies.AdamSpec(**{"learning_rate": 1e-2, **adam})))
