"""data_plane.wire.tensors against the official SDK's own encoder/decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types as tt
from tinker.proto import request_conv, response_conv
from tinker.proto import tinker_public_pb2 as sdk_pb

from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.tensors import (
    TensorDecodeError,
    decode_model_input,
    decode_tensor,
    encode_batched_tensor,
    forward_backward_output,
)


def _sdk_request(datums: list[tt.Datum], loss_fn="cross_entropy", config=None) -> pb.ForwardBackwardRequest:
    req = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=datums, loss_fn=loss_fn, loss_fn_config=config),
        model_id="m:train:0",
        seq_id=1,
    )
    raw = request_conv.forward_backward_request_to_proto(req).SerializeToString()
    return pb.ForwardBackwardRequest.FromString(raw)


def test_dense_roundtrip_via_sdk_encoder():
    d = tt.Datum(
        model_input=tt.ModelInput.from_ints([1, 5, 9, 13, 17, 21]),
        loss_fn_inputs={"target_tokens": [5, 9, 13, 17, 21, 25], "weights": [0, 0, 1, 1, 1, 1]},
    )
    msg = _sdk_request([d], config={"clip_low_threshold": 0.9, "mode": "x"})
    (datum,) = msg.data
    toks = decode_model_input(datum.model_input)
    assert toks.dtype == np.int64 and toks.tolist() == [1, 5, 9, 13, 17, 21]
    tgt = decode_tensor(datum.loss_fn_inputs["target_tokens"], "target_tokens")
    w = decode_tensor(datum.loss_fn_inputs["weights"], "weights")
    assert tgt.dtype == np.int64 and tgt.tolist() == [5, 9, 13, 17, 21, 25]
    assert w.dtype == np.float32 and w.tolist() == [0, 0, 1, 1, 1, 1]
    assert msg.loss_fn_config_v2["clip_low_threshold"].number == 0.9
    assert msg.loss_fn_config_v2["mode"].text == "x"


def test_multiple_chunks_concatenate():
    mi = tt.ModelInput(chunks=[tt.EncodedTextChunk(tokens=[1, 2]), tt.EncodedTextChunk(tokens=[3])])
    d = tt.Datum(model_input=mi, loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1, 1, 1]})
    (datum,) = _sdk_request([d]).data
    assert decode_model_input(datum.model_input).tolist() == [1, 2, 3]


def test_sparse_csr_2d_densified_with_zero():
    dense_t = torch.zeros(6, 4, dtype=torch.int64)
    dense_t[1, 2] = 7
    dense_t[4, 0] = 3
    dense_w = torch.zeros(6, 4, dtype=torch.float32)
    dense_w[1, 2] = 0.5
    dense_w[4, 0] = -2.0
    d = tt.Datum(
        model_input=tt.ModelInput.from_ints(list(range(6))),
        loss_fn_inputs={"target_tokens": dense_t, "weights": dense_w},
    )
    (datum,) = _sdk_request([d]).data
    assert datum.loss_fn_inputs["target_tokens"].WhichOneof("encoding") == "sparse_csr"
    t = decode_tensor(datum.loss_fn_inputs["target_tokens"])
    w = decode_tensor(datum.loss_fn_inputs["weights"])
    np.testing.assert_array_equal(t, dense_t.numpy())
    np.testing.assert_array_equal(w, dense_w.numpy())
    assert t.shape == (6, 4) and w.dtype == np.float32


def _sparse(values, crow, col, shape, dtype=pb.DTYPE_FLOAT32):
    m = pb.Tensor(dtype=dtype, shape=shape)
    m.sparse_csr.values = np.asarray(values, "<f4" if dtype == pb.DTYPE_FLOAT32 else "<i8").tobytes()
    m.sparse_csr.crow_indices = np.asarray(crow, "<i8").tobytes()
    m.sparse_csr.col_indices = np.asarray(col, "<i8").tobytes()
    return m


def test_sparse_csr_handwritten():
    m = _sparse([1.5, 2.5, 3.5], [0, 2, 2, 3], [0, 3, 1], [3, 4])
    np.testing.assert_array_equal(
        decode_tensor(m), np.array([[1.5, 0, 0, 2.5], [0, 0, 0, 0], [0, 3.5, 0, 0]], np.float32)
    )


@pytest.mark.parametrize(
    "msg, match",
    [
        (_sparse([1.0], [0, 1], [5], [1, 4]), "col_indices out of range"),
        (_sparse([1.0], [0, 1, 1], [0], [1, 4]), "crow_indices"),
        (_sparse([1.0, 2.0], [0, 1], [0], [1, 4]), "col_indices"),
        (_sparse([1.0], [0, 2], [0], [1, 4]), "end at nnz"),
        (_sparse([1.0], [0, 1], [0], [4]), "2-D"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], dense=b"\x00" * 8), "needs 3 elements"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], dense=b"\x00" * 3), "multiple"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], dense=b"\x00" * 4), "unsupported dtype"),
    ],
)
def test_malformed_tensors_raise_clear_errors(msg, match):
    with pytest.raises(TensorDecodeError, match=match):
        decode_tensor(msg)


def test_empty_shape_is_1d_and_int32_bf16_widen():
    m = pb.Tensor(dtype=pb.DTYPE_INT64, dense=np.array([3, 4], "<i8").tobytes())
    assert decode_tensor(m).tolist() == [3, 4]
    m = pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2], dense=np.array([3, 4], "<i4").tobytes())
    out = decode_tensor(m)
    assert out.dtype == np.int64 and out.tolist() == [3, 4]
    bf = (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype("<u2")
    m = pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[2], dense=bf.tobytes())
    assert decode_tensor(m).tolist() == [1.5, -2.0]


def test_image_and_dmel_chunks_rejected():
    c = pb.Chunk()
    c.image.data = b"png"
    c.image.format = "png"
    with pytest.raises(TensorDecodeError, match="image"):
        decode_model_input([c])
    c = pb.Chunk()
    c.dmel.dmel = b"x"
    with pytest.raises(TensorDecodeError, match="dmel"):
        decode_model_input([c])
    with pytest.raises(TensorDecodeError, match="empty chunk"):
        decode_model_input([pb.Chunk()])


def test_output_decoded_by_sdk_with_mixed_trailing_shapes():
    per_datum = [
        {"logprobs": np.array([-1.0, -2.0], np.float32), "elementwise_loss": np.array([0.5, 1.0], np.float32)},
        {"logprobs": np.array([-3.0], np.float32), "elementwise_loss": np.array([2.0], np.float32)},
        {"logprobs": np.arange(6, dtype=np.float32).reshape(3, 2), "elementwise_loss": np.ones((3, 2), np.float32)},
    ]
    out = forward_backward_output(per_datum, {"loss:sum": 3.5, "n_tokens:sum": 3})
    assert len(out.loss_fn_outputs) == 2
    raw = out.SerializeToString()
    sdk_pb.ForwardBackwardOutput.FromString(raw)  # same binary format as the SDK's package
    res = response_conv.deserialize_forward_backward_output(raw)
    assert res.metrics == {"loss:sum": 3.5, "n_tokens:sum": 3.0}
    assert len(res.loss_fn_outputs) == 3
    assert res.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0]
    assert res.loss_fn_outputs[1]["elementwise_loss"].tolist() == [2.0]
    np.testing.assert_array_equal(res.loss_fn_outputs[2]["logprobs"].to_numpy(), per_datum[2]["logprobs"])


def test_output_rejects_bad_metric_keys():
    with pytest.raises(ValueError, match="name:reduction"):
        forward_backward_output([], {"loss": 1.0})
    with pytest.raises(ValueError, match="name:reduction"):
        forward_backward_output([], {"a:b:sum": 1.0})


def test_encode_batched_tensor_offsets_are_bytes():
    bt = encode_batched_tensor([np.zeros(2, np.float32), np.zeros(3, np.float32)])
    assert np.frombuffer(bt.offsets, "<i8").tolist() == [0, 8, 20]
    assert list(bt.trailing_shape) == []
