"""The benchmark training batch shared by bench.trainer_sdk, bench.durable, bench.loss_memory
and bench.gpu_trainer: BATCH random sequences of SEQ + 1 tokens, LoRA rank RANK, learning rate LR,
and the protobuf request a worker receives for such rows (numpy only at import, so a measured
process can import it)."""

from __future__ import annotations

import numpy as np

BATCH, SEQ, RANK, LR = 32, 256, 32, 1e-4


def batch_tokens(vocab: int, seed: int = 0) -> np.ndarray:
    """BATCH random sequences of SEQ + 1 token ids (inputs and their next-token targets)."""
    return np.random.default_rng(seed).integers(0, vocab, size=(BATCH, SEQ + 1), dtype=np.int64)


def sft_request(rows: np.ndarray) -> bytes:
    """A Tinker ``ForwardBackwardRequest`` (what a worker receives) for token rows
    ``[batch, seq + 1]``: cross-entropy on every next token, weight 1."""
    from data_plane.wire import tinker_wire_pb2 as pb

    seq = int(rows.shape[1]) - 1
    req = pb.ForwardBackwardRequest(model_id="bench", loss_fn="cross_entropy")
    for row in rows:
        d = req.data.add()
        d.model_input.add().encoded_text.tokens = row[:-1].astype("<i4").tobytes()
        tgt = d.loss_fn_inputs["target_tokens"]
        tgt.dtype, tgt.dense = pb.DTYPE_INT64, row[1:].astype("<i8").tobytes()
        tgt.shape.extend([seq])
        w = d.loss_fn_inputs["weights"]
        w.dtype, w.dense = pb.DTYPE_FLOAT32, np.ones(seq, "<f4").tobytes()
        w.shape.extend([seq])
    return req.SerializeToString()
