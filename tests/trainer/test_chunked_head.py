"""The memory savers change nothing but memory: log-probabilities through the output projection
a chunk at a time, and activation checkpointing of the decoder layers, give the same losses,
outputs and gradients as the full logits with every activation kept, for every loss and both
dialects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker.proto import response_conv

from data_plane.storage.local import LocalDirStore
from data_plane.trainer import chunked_head
from data_plane.trainer.model import load_base
from data_plane.trainer.training import TrainingModel
from data_plane.wire import op_bodies
from tests.trainer.conftest import fwd_request, sft_batch
from tests.trainer.loops_support import grads, loops_request, strict_json
from tests.trainer.loss_cases import CASES

VOCAB = 2048  # the tiny model's
CHUNK_ROWS = 7  # several chunks per batch, the last one short


@pytest.fixture
def pair(tiny_model, tmp_path):
    """(plain, chunked): the same adapter on two copies of the base."""

    def make(chunk_bytes: int, checkpointing: str = "off") -> TrainingModel:
        m = TrainingModel(
            model_id="s:train:0",
            base_model_name="openloops/tiny",
            base=load_base(str(tiny_model), torch.device("cpu"), torch.float32),
            device=torch.device("cpu"),
            store=LocalDirStore(tmp_path / "store"),
            max_seq_len=512,
            microbatch_tokens=4096,
            logits_chunk_bytes=chunk_bytes,
            activation_checkpointing=checkpointing,
        )
        m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=4, seed=3)))
        return m

    plain, chunked = make(0), make(CHUNK_ROWS * VOCAB * 4, "on")
    assert chunked.engine is not None and chunked.engine._split_head is not None  # the chunked path runs
    assert len(chunked.engine.checkpointing.layers) == 2 and chunked.engine.checkpointing.wanted(1)
    return plain, chunked


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> dict[str, int]:
    """Replace ``owner.name`` by a wrapper that counts its calls in the returned ``{"n": ...}``."""
    calls = {"n": 0}
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def _same_grads(a: TrainingModel, b: TrainingModel) -> None:
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for k in ga:  # float32 sums over positions in another order: compare at the tensor's scale
        diff = float((ga[k] - gb[k]).norm() / ga[k].norm().clamp_min(1e-30))
        assert diff <= 1e-5, (k, diff)


@pytest.mark.parametrize(("name", "data", "config"), CASES, ids=[c[0] for c in CASES])
def test_tinker_losses_outputs_and_gradients_match(pair, name, data, config) -> None:
    loss_fn = name.split()[0]
    plain, chunked = pair
    outs = [
        response_conv.deserialize_forward_backward_output(
            m.forward_backward(fwd_request(data(), loss_fn=loss_fn, config=config))
        )
        for m in (plain, chunked)
    ]
    # a sum of terms of both signs (RL advantages): compare at the terms' scale
    scale = sum(
        float(np.abs(o["elementwise_loss"].to_numpy()).sum())
        for o in outs[0].loss_fn_outputs
        if "elementwise_loss" in o
    )
    assert outs[1].metrics["loss:sum"] == pytest.approx(outs[0].metrics["loss:sum"], rel=1e-6, abs=1e-6 * scale)
    for a, b in zip(outs[0].loss_fn_outputs, outs[1].loss_fn_outputs, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key].to_numpy(), a[key].to_numpy(), rtol=1e-5, atol=1e-6)
    _same_grads(plain, chunked)


def test_loops_dialect_with_top_k_matches(pair) -> None:
    plain, chunked = pair
    data = []
    for x in sft_batch(8, n=3):
        t = x["target_tokens"].copy()
        t[:3] = -100
        data.append({"tokens": x["tokens"], "target_tokens": t})
    outs = [
        strict_json(m.loops_forward_backward(loops_request(data, config={"top_k_logprobs": 5})))
        for m in (plain, chunked)
    ]
    assert outs[1]["loss"] == pytest.approx(outs[0]["loss"], rel=1e-6)
    for a, b in zip(outs[0]["loss_fn_outputs"], outs[1]["loss_fn_outputs"], strict=True):
        assert a.keys() == b.keys() and "top_k_logprobs" in a
        for key in a:
            got, want = np.asarray(b[key]["data"], dtype=float), np.asarray(a[key]["data"], dtype=float)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    _same_grads(plain, chunked)


def test_forward_only_and_empty_inputs(pair) -> None:
    plain, chunked = pair
    outs = [
        response_conv.deserialize_forward_backward_output(
            m.forward_backward(fwd_request(sft_batch(9, n=2), forward_only=True))
        )
        for m in (plain, chunked)
    ]
    assert outs[1].metrics["loss:sum"] == pytest.approx(outs[0].metrics["loss:sum"], rel=1e-6)
    assert grads(chunked) == {}
    head = torch.nn.Linear(8, 16)
    tlp, lse, top = chunked_head.target_logprobs(head, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 4, 2)
    assert tlp.shape == (0,) and lse.shape == (0, 1) and top is None


def test_rows_per_chunk() -> None:
    assert chunked_head.rows_per_chunk(151_936, 64 << 20) == 110
    assert chunked_head.rows_per_chunk(8192, 64 << 20) == 2048
    assert chunked_head.rows_per_chunk(10**9, 1) == 1


def test_checkpointed_layers_recompute_in_the_backward_pass(pair, monkeypatch) -> None:
    """The wrapped layers really run twice per backward (once more than without it)."""
    plain, chunked = pair
    assert chunked.engine is not None
    mlp = chunked.engine.checkpointing.layers[0].mlp  # called by the layer's forward, recompute included
    calls = count_calls(monkeypatch, mlp, "forward")
    chunked.forward_backward(fwd_request(sft_batch(1, n=2)))
    with_grad, calls["n"] = calls["n"], 0
    chunked.forward_backward(fwd_request(sft_batch(1, n=2), forward_only=True))
    assert (with_grad, calls["n"]) == (2, 1)
    from data_plane.trainer.activation_checkpointing import LayerCheckpointing

    assert LayerCheckpointing(plain.peft, "auto").wanted(4096)
    assert not LayerCheckpointing(plain.peft, "auto").wanted(4095)
    assert not LayerCheckpointing(plain.peft, "off").wanted(10**6)
    with pytest.raises(ValueError, match="must be one of"):
        LayerCheckpointing(plain.peft, "sometimes")


def test_small_logits_stay_in_one_piece(pair, monkeypatch) -> None:
    """Chunking only starts where a micro-batch's whole logits would pass logits_full_max_bytes."""
    _plain, chunked = pair
    assert chunked.engine is not None
    calls = count_calls(monkeypatch, chunked_head, "target_logprobs")
    data = sft_batch(1, n=2)  # 24 + 23 positions
    full = sum(len(d["tokens"]) for d in data) * VOCAB * 4
    chunked.engine.logits_full_max_bytes = full  # fits: one piece
    chunked.forward_backward(fwd_request(data))
    assert calls["n"] == 0
    chunked.engine.logits_full_max_bytes = full - 1  # does not fit: chunks
    chunked.forward_backward(fwd_request(data))
    assert calls["n"] == 1
