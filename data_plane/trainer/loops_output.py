"""JSON encoding of a Loops-dialect forward / forward_backward result.

The answer is UTF-8 JSON::

    {"loss": float,
     "loss_fn_output_type": "TensorData",
     "loss_fn_outputs": [{name: {"data": [...], "dtype": "float32" | "int64", "shape": [...]}, ...}, ...],
     "metrics": {"loss": float, "num_tokens": float, "skip_token_normalization": 0.0 | 1.0, ...}}

with one ``loss_fn_outputs`` entry per datum, in request order. ``data`` is the array flattened
in row-major order. JSON has no NaN or infinity: every non-finite float (NaN marks an inactive
position) is written as ``null``, which the Loops SDK reads back as NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

LOSS_FN_OUTPUT_TYPE = "TensorData"
# msgspec writes every non-finite float as null, and 15x faster than the json module (14 ms
# for a 32 x 256 step's two outputs): the same values, shortest round-trip digits
_ENCODER = msgspec.json.Encoder()


def tensor_data(arr: np.ndarray) -> dict:
    """``{"data", "dtype", "shape"}`` for a float (sent as float32) or integer (int64) array."""
    arr = np.asarray(arr)
    shape = [int(s) for s in arr.shape]
    flat = arr.reshape(-1)
    if arr.dtype.kind in "iub":
        return {"data": flat.astype(np.int64, copy=False).tolist(), "dtype": "int64", "shape": shape}
    if arr.dtype.kind != "f":
        raise ValueError(f"cannot encode dtype {arr.dtype} as TensorData")
    return {"data": flat.astype(np.float32, copy=False).tolist(), "dtype": "float32", "shape": shape}


def encode_forward_backward(
    loss: float, per_datum: Sequence[Mapping[str, np.ndarray]], metrics: Mapping[str, float]
) -> bytes:
    body = {
        "loss": float(loss),
        "loss_fn_output_type": LOSS_FN_OUTPUT_TYPE,
        "loss_fn_outputs": [{name: tensor_data(arr) for name, arr in d.items()} for d in per_datum],
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    return _ENCODER.encode(body)
