"""The SFT example the end-to-end tests train on: a text, and one cross-entropy datum of it."""

from __future__ import annotations

from typing import Any

from tinker import types

TEXT = "the cat sat on the mat and the cat sat on the mat again"


def datum(tok: Any, text: str) -> types.Datum:
    ids = tok.encode(text)
    inp, tgt = ids[:-1], ids[1:]
    return types.Datum(
        model_input=types.ModelInput.from_ints(inp),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tgt, dtype="int64", shape=[len(tgt)]),
            "weights": types.TensorData(data=[1.0] * len(tgt), dtype="float32", shape=[len(tgt)]),
        },
    )
