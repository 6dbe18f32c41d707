"""A small op of a CPU trainer runs on one intra-op thread; a larger one on the process's
threads; the count is restored whatever happens inside, and results do not change."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from tinker.proto import response_conv

from data_plane.storage.local import LocalDirStore
from data_plane.trainer.cpu_threads import threads_for
from data_plane.trainer.engine import Engine
from data_plane.trainer.model import load_base
from data_plane.trainer.training import TrainingModel
from data_plane.wire import op_bodies
from tests.trainer.conftest import fwd_request, sft_batch

CPU = torch.device("cpu")


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_small_op_gets_one_thread_and_the_count_comes_back(two_threads: None) -> None:
    with threads_for(CPU, 8, 128):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads_for(CPU, 128, 128):  # the threshold itself is small
        assert torch.get_num_threads() == 1
    with threads_for(CPU, 129, 128):
        assert torch.get_num_threads() == 2
    with threads_for(CPU, 8, 0):  # 0: never
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), threads_for(CPU, 8, 128):
        raise RuntimeError("an op that fails")
    assert torch.get_num_threads() == 2
    with threads_for(torch.device("meta"), 8, 128):  # not a CPU: left alone
        assert torch.get_num_threads() == 2


def test_the_trainer_runs_small_ops_on_one_thread_with_the_same_results(
    tiny_model, tmp_path, two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def model(small_op_tokens: int) -> TrainingModel:
        m = TrainingModel(
            model_id="s:train:0",
            base_model_name="openloops/tiny",
            base=load_base(str(tiny_model), CPU, torch.float32),
            device=CPU,
            store=LocalDirStore(tmp_path / "store"),
            max_seq_len=512,
            microbatch_tokens=4096,
            small_op_tokens=small_op_tokens,
        )
        m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=4, seed=3)))
        return m

    seen: list[int] = []
    real = Engine.forward_backward

    def recording(self: Engine, batch):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real(self, batch)

    monkeypatch.setattr(Engine, "forward_backward", recording)
    small, large = sft_batch(1, n=1, length=16), sft_batch(2, n=8, length=24)  # 16 and 164 tokens
    outs = {}
    for threshold in (0, 64):
        m = model(threshold)
        outs[threshold] = [
            response_conv.deserialize_forward_backward_output(m.forward_backward(fwd_request(batch)))
            for batch in (small, large)
        ]
    assert seen == [2, 2, 1, 2]  # threshold 0: never one thread; 64: the small op only
    assert torch.get_num_threads() == 2
    for a, b in zip(outs[0], outs[64], strict=True):
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), rtol=1e-5, atol=1e-5)
