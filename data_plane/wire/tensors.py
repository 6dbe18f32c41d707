"""numpy codecs for the tensors inside Tinker protobuf messages (no torch here).

Request side (what the SDK sends, ``proto/request_conv.py``):

- :func:`decode_tensor` — a ``Tensor`` (dense FLOAT32/INT64 little-endian bytes, or sparse CSR
  whose unlisted cells are 0) to a numpy array of its declared shape;
- :func:`decode_model_input` — a datum's ``model_input`` chunks to one int64 token array.

Response side (what the SDK reads, ``proto/response_conv.py``):

- :func:`encode_batched_tensor` and :func:`forward_backward_output` build a
  ``ForwardBackwardOutput`` from per-datum arrays (wire-protocol §9.3).

Every malformed input raises :class:`TensorDecodeError` (a ``ValueError``) whose message is
safe to show to the client: it is a user error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from data_plane.wire import tinker_wire_pb2 as pb


class TensorDecodeError(ValueError):
    """Malformed or unsupported tensor / model input (a client error)."""


# Request dtypes the SDK writes are FLOAT32 and INT64; INT32 and BFLOAT16 are accepted too and
# widened (int32 -> int64, bf16 -> float32) like the SDK's response decoder does.
_DECODE_DTYPES: dict[int, tuple[np.dtype, np.dtype]] = {
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), np.dtype(np.float32)),
    pb.DTYPE_INT64: (np.dtype("<i8"), np.dtype(np.int64)),
    pb.DTYPE_INT32: (np.dtype("<i4"), np.dtype(np.int64)),
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), np.dtype(np.float32)),
}
_ENCODE_DTYPES: dict[np.dtype, tuple[pb.DType, np.dtype]] = {
    np.dtype(np.float32): (pb.DTYPE_FLOAT32, np.dtype("<f4")),
    np.dtype(np.float64): (pb.DTYPE_FLOAT32, np.dtype("<f4")),
    np.dtype(np.int64): (pb.DTYPE_INT64, np.dtype("<i8")),
    np.dtype(np.int32): (pb.DTYPE_INT64, np.dtype("<i8")),
}

ARRAY_RECORD_TYPE = "ArrayRecord"


def _dtype_name(code: int) -> str:
    try:
        return pb.DType.Name(code)
    except ValueError:
        return str(code)


def _frombuffer(raw: bytes, wire: np.dtype, what: str) -> np.ndarray:
    if len(raw) % wire.itemsize:
        raise TensorDecodeError(f"{what}: {len(raw)} bytes is not a multiple of the {wire.itemsize}-byte element size")
    return np.frombuffer(raw, dtype=wire)


def _widen(arr: np.ndarray, code: int, out: np.dtype) -> np.ndarray:
    if code == pb.DTYPE_BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(out)  # always a copy: the result is writable and native-endian


def decode_tensor(msg: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Decode a protobuf ``Tensor`` to a numpy array (float32 or int64) of its shape.

    An empty ``shape`` means "1-D, as long as the data" (the SDK leaves it out for lists).
    Sparse CSR tensors must be 2-D and are densified with 0 in every unlisted cell.
    """
    if msg.dtype not in _DECODE_DTYPES:
        raise TensorDecodeError(f"{name}: unsupported dtype {_dtype_name(msg.dtype)}")
    wire, out = _DECODE_DTYPES[msg.dtype]
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise TensorDecodeError(f"{name}: negative dimension in shape {shape}")
    kind = msg.WhichOneof("encoding")

    if kind == "sparse_csr":
        if len(shape) != 2:
            raise TensorDecodeError(f"{name}: sparse CSR tensors must be 2-D, got shape {shape}")
        nrows, ncols = shape
        csr = msg.sparse_csr
        values = _frombuffer(csr.values, wire, f"{name}.sparse_csr.values")
        crow = _frombuffer(csr.crow_indices, np.dtype("<i8"), f"{name}.sparse_csr.crow_indices")
        col = _frombuffer(csr.col_indices, np.dtype("<i8"), f"{name}.sparse_csr.col_indices")
        if crow.size != nrows + 1:
            raise TensorDecodeError(
                f"{name}: sparse CSR needs {nrows + 1} crow_indices for {nrows} rows, got {crow.size}"
            )
        nnz = values.size
        if col.size != nnz:
            raise TensorDecodeError(f"{name}: sparse CSR has {nnz} values but {col.size} col_indices")
        if crow[0] != 0 or crow[-1] != nnz or np.any(np.diff(crow) < 0):
            raise TensorDecodeError(
                f"{name}: sparse CSR crow_indices must start at 0, never decrease and end at nnz={nnz}"
            )
        if nnz and (col.min() < 0 or col.max() >= ncols):
            raise TensorDecodeError(f"{name}: sparse CSR col_indices out of range [0, {ncols})")
        dense = np.zeros((nrows, ncols), dtype=out)
        rows = np.repeat(np.arange(nrows, dtype=np.int64), np.diff(crow))
        dense[rows, col] = _widen(values, msg.dtype, out)
        return dense

    if kind != "dense":
        # proto3 cannot tell "dense = b''" from "unset": treat it as an empty dense tensor.
        raw = b""
    else:
        raw = msg.dense
    flat = _widen(_frombuffer(raw, wire, name), msg.dtype, out)
    if not shape:
        return flat
    expected = math.prod(shape)
    if flat.size != expected:
        raise TensorDecodeError(f"{name}: shape {shape} needs {expected} elements, the data holds {flat.size}")
    return flat.reshape(shape)


def decode_tokens(chunk: pb.EncodedTextChunk) -> np.ndarray:
    return _frombuffer(chunk.tokens, np.dtype("<i4"), "encoded_text.tokens").astype(np.int64)


def decode_model_input(chunks: Sequence[pb.Chunk]) -> np.ndarray:
    """Concatenate a datum's ``model_input`` chunks into one int64 token array.

    Only text is supported: image and dmel (audio) chunks raise :class:`TensorDecodeError`.
    """
    parts: list[np.ndarray] = []
    for i, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        if kind == "encoded_text":
            parts.append(decode_tokens(chunk.encoded_text))
        elif kind == "image":
            raise TensorDecodeError(f"model_input chunk {i}: image inputs are not supported by this model (text only)")
        elif kind == "dmel":
            raise TensorDecodeError(
                f"model_input chunk {i}: audio (dmel) inputs are not supported by this model (text only)"
            )
        else:
            raise TensorDecodeError(f"model_input chunk {i}: empty chunk (no chunk type set)")
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def encode_batched_tensor(arrays: Sequence[np.ndarray]) -> pb.BatchedTensor:
    """Pack per-datum arrays (same dtype and trailing shape) into one ``BatchedTensor``."""
    bt = pb.BatchedTensor()
    if not arrays:
        bt.dtype = pb.DTYPE_FLOAT32
        bt.offsets = np.zeros(1, dtype="<i8").tobytes()
        return bt
    src = np.dtype(arrays[0].dtype)
    if src not in _ENCODE_DTYPES:
        raise ValueError(f"cannot encode dtype {src} in a BatchedTensor")
    code, wire = _ENCODE_DTYPES[src]
    trailing = tuple(arrays[0].shape[1:])
    blobs: list[bytes] = []
    for a in arrays:
        if tuple(a.shape[1:]) != trailing or np.dtype(a.dtype) != src:
            raise ValueError("all arrays in one BatchedTensor need the same dtype and trailing shape")
        blobs.append(np.ascontiguousarray(a, dtype=wire).tobytes())
    bt.dtype = code
    bt.trailing_shape.extend(int(t) for t in trailing)
    bt.data = b"".join(blobs)
    bt.offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64).astype("<i8").tobytes()
    return bt


def check_metric_key(key: str) -> None:
    """The SDK splits every forward_backward metric key on ``:`` into exactly two parts."""
    if key.count(":") != 1 or key.startswith(":") or key.endswith(":"):
        raise ValueError(f"metric key {key!r} must look like 'name:reduction'")


def forward_backward_output(
    per_datum: Sequence[Mapping[str, np.ndarray]], metrics: Mapping[str, float]
) -> pb.ForwardBackwardOutput:
    """Build a ``ForwardBackwardOutput`` (one ``ArrayRecord`` per run of consecutive datums
    whose fields share trailing shapes, so ``[N]`` and ``[N, K]`` outputs can mix)."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type=ARRAY_RECORD_TYPE)
    for key, value in metrics.items():
        check_metric_key(key)
        out.metrics[key] = float(value)

    def signature(d: Mapping[str, np.ndarray]) -> tuple:
        return tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in d.items()))

    i = 0
    while i < len(per_datum):
        sig = signature(per_datum[i])
        j = i + 1
        while j < len(per_datum) and signature(per_datum[j]) == sig:
            j += 1
        group = per_datum[i:j]
        rec = out.loss_fn_outputs.add()
        rec.type_tag = ARRAY_RECORD_TYPE
        rec.num_datums = len(group)
        for name in per_datum[i]:
            rec.fields[name].CopyFrom(encode_batched_tensor([d[name] for d in group]))
        i = j
    return out
