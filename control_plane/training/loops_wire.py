"""The JSON bodies of the Loops trainer data plane (as ``baseten-loops`` 0.32 sends them), and
their translation to the worker's op bodies.

``forward`` / ``forward_backward`` datums become a protobuf ``ForwardBackwardRequest`` (the
worker's one input format): token chunks as int32 tokens, each ``TensorData`` as a dense
tensor (``null`` entries, which the SDK writes for masked float positions, as NaN), and the
Loops options ``top_k_logprobs`` and ``skip_token_normalization`` as reserved
``loss_fn_config_v2`` keys that the worker's Loops dialect takes out again.

Every malformed input raises :class:`~control_plane.errors.InvalidInput` naming the field.

The bodies' types are what the API decodes at the edge (a body of the wrong shape is refused
before it takes a seq slot). The limits in ``Doc(...)`` are the ones the op checks itself,
after its seq id is known, so that a refused op still fills its slot
(:meth:`~control_plane.training.loops_ops.LoopsTrainerOps.submit`): the OpenAPI shows them,
the edge does not enforce them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec
import numpy as np
from litestar.params import KwargDefinition as Doc

from control_plane.errors import InvalidInput
from control_plane.fields import CHECKPOINT_PATH, RunId, Text, check_json
from control_plane.training.ops import MAX_SEQ_ID, MAX_TTL_SECONDS
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.paths import NAME_RE

MAX_TOP_K = 20
TokenId = Annotated[int, Doc(ge=0, le=2**31 - 1)]
INT_DTYPES = {
    "int64": np.int64,
    "int32": np.int64,
    "int16": np.int64,
    "int8": np.int64,
    "uint8": np.int64,
    "bool": np.int64,
}
FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}


class TensorData(msgspec.Struct, kw_only=True):
    data: list[Any]  # numbers (null: a masked float position), flat, row-major
    dtype: Annotated[str, Doc(description=f"one of {sorted({*INT_DTYPES, *FLOAT_DTYPES})}")]
    shape: list[Annotated[int, Doc(ge=0)]] | None = None


class Chunk(msgspec.Struct, kw_only=True):
    type: Annotated[str, Doc(description="encoded_text (the only kind this server takes)")] = "encoded_text"
    tokens: list[TokenId] | None = None


class ModelInput(msgspec.Struct, kw_only=True):
    chunks: Annotated[list[Chunk], Doc(min_items=1)] = msgspec.field(default_factory=list)


class Datum(msgspec.Struct, kw_only=True):
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = msgspec.field(default_factory=dict)  # needs target_tokens
    routed_experts_ref: dict[str, Any] | None = None  # router replay: not supported


class _Op(msgspec.Struct, kw_only=True):
    seq_id: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ_ID)]
    run_id: RunId | None = None  # = X-Run-Id
    model: Text | None = None  # the base model; the serverless queue routes by it


class InitBody(_Op, kw_only=True):
    lora_rank: Annotated[int, Doc(description="the run's lora_rank")]
    base_model: Text | None = None


class ForwardBody(_Op, kw_only=True):
    data: Annotated[list[Datum], Doc(min_items=1)]
    loss_fn: Annotated[str, Doc(min_length=1)] = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = None  # numbers, booleans or strings
    top_k_logprobs: Annotated[int, Doc(ge=0, le=MAX_TOP_K)] = 0


class OptimBody(_Op, kw_only=True):
    adam_params: dict[str, Any] = msgspec.field(default_factory=dict)


class SaveBody(_Op, kw_only=True):
    name: Annotated[str, Doc(max_length=200, pattern=NAME_RE.pattern)]
    ttl_seconds: Annotated[int, Doc(ge=1, le=MAX_TTL_SECONDS)] | None = None
    bump_version: bool = False


class LoadBody(_Op, kw_only=True):
    # a tinker:// or bt://loops: path of this server's checkpoint (checked by the op; a NUL at once)
    path: Annotated[str, Doc(pattern=CHECKPOINT_PATH)]

    def __post_init__(self) -> None:
        check_json(self.path, "path")


OPS: dict[str, type[_Op]] = {
    "init_trainer_server": InitBody,
    "forward": ForwardBody,
    "forward_backward": ForwardBody,
    "optim_step": OptimBody,
    "save_state": SaveBody,
    "save_weights_for_sampler": SaveBody,
    "load_state": LoadBody,
    "load_state_with_optimizer": LoadBody,
}


def decode(op: str, raw: bytes) -> _Op:
    try:
        return msgspec.json.decode(raw, type=OPS[op])
    except RecursionError:
        raise InvalidInput(f"the {op} body is nested too deeply", field="body") from None
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid {op} body: {exc}", field=_field_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"the {op} body is not valid JSON: {exc}") from None


def _field_of(message: str) -> str | None:
    if "`$." in message:
        return message.split("`$.", 1)[1].split("`", 1)[0]
    if "missing required field `" in message:
        return message.split("missing required field `", 1)[1].split("`", 1)[0]
    return None


def forward_request(body: ForwardBody, *, forward_only: bool) -> bytes:
    """The protobuf ``ForwardBackwardRequest`` of a Loops ``forward``/``forward_backward``."""
    if not body.data:
        raise InvalidInput("data must contain at least one datum", field="data")
    if not body.loss_fn:
        raise InvalidInput("loss_fn is required", field="loss_fn")
    if not 0 <= body.top_k_logprobs <= MAX_TOP_K:
        raise InvalidInput(f"top_k_logprobs must be between 0 and {MAX_TOP_K}", field="top_k_logprobs")
    req = pb.ForwardBackwardRequest(loss_fn=body.loss_fn, forward_only=forward_only)
    for key, value in (body.loss_fn_config or {}).items():
        _config(req, key, value)
    if body.top_k_logprobs:
        req.loss_fn_config_v2["top_k_logprobs"].number = float(body.top_k_logprobs)
    for i, d in enumerate(body.data):
        _datum(req.data.add(), d, f"data[{i}]")
    return bytes(req.SerializeToString())


def _config(req: pb.ForwardBackwardRequest, key: str, value: Any) -> None:
    if key in ("top_k_logprobs",):
        raise InvalidInput(
            f"loss_fn_config[{key!r}] is reserved; pass it as the top_k_logprobs argument", field="loss_fn_config"
        )
    if isinstance(value, bool):
        value = 1.0 if value else 0.0
    if isinstance(value, int | float):
        if not math.isfinite(float(value)):
            raise InvalidInput(f"loss_fn_config[{key!r}] must be finite", field="loss_fn_config")
        req.loss_fn_config_v2[key].number = float(value)
    elif isinstance(value, str):
        req.loss_fn_config_v2[key].text = value
    else:
        raise InvalidInput(f"loss_fn_config[{key!r}] must be a number, a boolean or a string", field="loss_fn_config")


def _datum(msg: pb.Datum, d: Datum, where: str) -> None:
    if d.routed_experts_ref is not None:
        raise InvalidInput(
            f"{where}.routed_experts_ref: router replay is not supported by this server", field="routed_experts_ref"
        )
    if not d.model_input.chunks:
        raise InvalidInput(f"{where}.model_input is empty", field="model_input")
    for j, chunk in enumerate(d.model_input.chunks):
        if chunk.type != "encoded_text" or chunk.tokens is None:
            raise InvalidInput(
                f"{where}.model_input.chunks[{j}]: {chunk.type} chunks are not supported by this server (text only)",
                field="model_input",
            )
        tokens = _ints(chunk.tokens, f"{where}.model_input.chunks[{j}].tokens")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**31):
            raise InvalidInput(
                f"{where}.model_input.chunks[{j}].tokens: token ids must be in [0, 2^31)", field="model_input"
            )
        msg.model_input.add().encoded_text.tokens = tokens.astype("<i4").tobytes()
    if "target_tokens" not in d.loss_fn_inputs:
        raise InvalidInput(f"{where}.loss_fn_inputs is missing 'target_tokens'", field="loss_fn_inputs")
    for name, td in d.loss_fn_inputs.items():
        msg.loss_fn_inputs[name].CopyFrom(tensor(td, f"{where}.loss_fn_inputs[{name!r}]"))


def _ints(values: list[Any], what: str) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{what} must be a flat list of integers", field="loss_fn_inputs") from None
    if arr.ndim != 1:
        raise InvalidInput(f"{what} must be a flat list of integers", field="loss_fn_inputs")
    if arr.size == 0 or arr.dtype.kind in "iub":
        try:
            return arr.astype(np.int64)
        except OverflowError:
            raise InvalidInput(f"{what}: integers out of the int64 range", field="loss_fn_inputs") from None
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise InvalidInput(f"{what} must hold integers", field="loss_fn_inputs")


def tensor(td: TensorData, what: str) -> pb.Tensor:
    """A dense protobuf tensor of a Loops ``TensorData`` (flat ``data`` in row-major order)."""
    if td.dtype in INT_DTYPES:
        arr = _ints(td.data, what)
        out = pb.Tensor(dtype=pb.DTYPE_INT64)
        raw = arr.astype("<i8").tobytes()
    elif td.dtype in FLOAT_DTYPES:
        try:
            arr = np.asarray(td.data, dtype=np.float64)  # null (masked positions) becomes NaN
        except (TypeError, ValueError, OverflowError):
            raise InvalidInput(f"{what} must hold numbers (or null)", field="loss_fn_inputs") from None
        if arr.ndim != 1:
            raise InvalidInput(f"{what}.data must be a flat list", field="loss_fn_inputs")
        out = pb.Tensor(dtype=pb.DTYPE_FLOAT32)
        raw = arr.astype("<f4").tobytes()
    else:
        raise InvalidInput(f"{what}: unsupported dtype {td.dtype!r}", field="loss_fn_inputs")
    shape = td.shape if td.shape is not None else [int(arr.size)]
    if any(s < 0 for s in shape) or math.prod(shape) != arr.size:
        raise InvalidInput(
            f"{what}: shape {shape} needs {math.prod(shape)} values, data holds {arr.size}", field="loss_fn_inputs"
        )
    out.shape.extend(int(s) for s in shape)
    out.dense = raw
    return out
