"""The engine in-process on the tiny model: alignment, 2-D targets, sparse inputs, micro-batching,
gradient accumulation, forward-only, optimizer behaviour and checkpoint round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types as tt
from tinker.proto import request_conv, response_conv

from data_plane.storage.local import LocalDirStore
from data_plane.trainer import checkpoint as ckpt
from data_plane.trainer.batches import Prepared, plan_microbatches
from data_plane.trainer.errors import UserError
from data_plane.trainer.model import LoraSettings, load_base
from data_plane.trainer.training import TrainingModel
from data_plane.wire import op_bodies
from data_plane.wire import tinker_wire_pb2 as pb
from tests.trainer.conftest import fwd_request, sft_batch

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def make_model(tiny_model, tmp_path):
    def _make(microbatch_tokens: int = 4096, rank: int = 4, **lora) -> TrainingModel:
        base = load_base(str(tiny_model), torch.device("cpu"), torch.float32)
        m = TrainingModel(
            model_id="s:train:0",
            base_model_name="openloops/tiny",
            base=base,
            device=torch.device("cpu"),
            store=LocalDirStore(tmp_path / "store"),
            max_seq_len=512,
            microbatch_tokens=microbatch_tokens,
        )
        m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=rank, seed=3, **lora)))
        return m

    return _make


def run(m: TrainingModel, datums, **kw):
    raw = m.forward_backward(fwd_request(datums, **kw))
    return response_conv.deserialize_forward_backward_output(raw)


def grads(m: TrainingModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.engine.named_params if p.grad is not None}


def step(m: TrainingModel, **adam):
    return m.optim_step(op_bodies.OptimStepBody(op_bodies.AdamSpec(**{"learning_rate": 1e-2, **adam})))


def test_alignment_logits_at_i_predict_target_i(make_model):
    m = make_model()
    d = sft_batch(0, n=1)[0]
    out = run(m, [d], forward_only=True)
    with torch.no_grad():
        logits = m.peft(input_ids=torch.from_numpy(d["tokens"])[None]).logits[0]
    want = torch.log_softmax(logits, -1)[torch.arange(len(d["tokens"])), torch.from_numpy(d["target_tokens"])]
    np.testing.assert_allclose(out.loss_fn_outputs[0]["logprobs"].to_numpy(), want.numpy(), **TOL)
    assert out.metrics["loss:sum"] == pytest.approx(-(want.numpy() * d["weights"]).sum(), rel=1e-5)


def test_forward_only_touches_no_gradients(make_model):
    m = make_model()
    run(m, sft_batch(0), forward_only=True)
    assert grads(m) == {}
    run(m, sft_batch(0))
    g = grads(m)
    run(m, sft_batch(1), forward_only=True)
    after = grads(m)
    assert all(torch.equal(g[k], after[k]) for k in g)


def test_gradients_accumulate_across_calls(make_model):
    a, b = sft_batch(0, n=2), sft_batch(1, n=2)
    m1 = make_model()
    run(m1, a)
    run(m1, b)
    m2 = make_model()
    run(m2, a + b)
    g1, g2 = grads(m1), grads(m2)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)
    step(m1)
    assert grads(m1) == {}  # optim_step clears them


def test_microbatching_matches_one_big_batch(make_model):
    data = sft_batch(5, n=5, length=30)
    big = run(make_model(microbatch_tokens=4096), data)
    small_model = make_model(microbatch_tokens=40)  # forces 1-datum micro-batches
    small = run(small_model, data)
    assert big.metrics["loss:sum"] == pytest.approx(small.metrics["loss:sum"], rel=1e-5)
    for x, y in zip(big.loss_fn_outputs, small.loss_fn_outputs):
        np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), **TOL)


def test_plan_microbatches_respects_budget():
    def p(n, k=0):
        t = np.zeros(n, np.int64)
        return Prepared(t, t if not k else np.zeros((n, k), np.int64), {})

    data = [p(10), p(50), p(20), p(20), p(200), p(5, k=3)]
    groups = plan_microbatches(data, 60)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len({data[i].k for i in g}) == 1
        assert len(g) == 1 or len(g) * max(data[i].length for i in g) <= 60
    assert [4] in groups  # longer than the budget: alone


def test_two_dim_targets_dense_and_sparse_via_sdk(make_model):
    m = make_model()
    n, k = 6, 3
    rng = np.random.default_rng(0)
    tokens = rng.integers(6, 2048, n)
    targets = torch.from_numpy(rng.integers(6, 2048, (n, k)))
    weights = torch.zeros(n, k)
    weights[2, 0], weights[4, 1], weights[5, 2] = 1.0, -0.5, 2.0  # sparse: the SDK sends CSR
    datum = tt.Datum(
        model_input=tt.ModelInput.from_ints(tokens.tolist()),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    one_d = tt.Datum(
        model_input=tt.ModelInput.from_ints(tokens.tolist()),
        loss_fn_inputs={"target_tokens": tokens[::-1].copy(), "weights": np.ones(n, np.float32)},
    )
    req = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=[datum, one_d], loss_fn="cross_entropy"),
        model_id="x",
        seq_id=1,
    )
    msg = request_conv.forward_backward_request_to_proto(req)
    assert msg.data[0].loss_fn_inputs["weights"].WhichOneof("encoding") == "sparse_csr"
    out = response_conv.deserialize_forward_backward_output(m.forward_backward(msg.SerializeToString()))
    lp = out.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert lp.shape == (n, k)
    with torch.no_grad():
        full = torch.log_softmax(m.peft(input_ids=torch.from_numpy(tokens)[None]).logits[0], -1)
    np.testing.assert_allclose(lp, full.gather(-1, targets).numpy(), **TOL)
    assert out.loss_fn_outputs[1]["logprobs"].to_numpy().shape == (n,)
    want = (
        -(full.gather(-1, targets) * weights).sum()
        - full.gather(-1, torch.from_numpy(tokens[::-1].copy())[:, None]).sum()
    )
    assert out.metrics["loss:sum"] == pytest.approx(float(want), rel=1e-5)


def test_rl_losses_through_the_engine(make_model):
    m = make_model()
    d = sft_batch(2, n=2)
    rl = [
        {
            "tokens": x["tokens"],
            "target_tokens": x["target_tokens"],
            "logprobs": np.full(len(x["tokens"]), -7.0, np.float32),
            "advantages": np.linspace(-1, 1, len(x["tokens"])).astype(np.float32),
        }
        for x in d
    ]
    rl[0]["clip_low_threshold"] = np.full(len(rl[0]["tokens"]), 0.5, np.float32)  # per-token, one datum only
    for loss_fn, cfg in [
        ("importance_sampling", None),
        ("ppo", None),
        ("cispo", {"clip_high_threshold": 1.5}),
        ("dro", {"beta": 0.1}),
    ]:
        out = run(m, rl, loss_fn=loss_fn, config=cfg)
        assert [o["logprobs"].to_numpy().shape for o in out.loss_fn_outputs] == [(len(x["tokens"]),) for x in rl]
        el = sum(float(o["elementwise_loss"].to_numpy().sum()) for o in out.loss_fn_outputs)
        assert out.metrics["loss:sum"] == pytest.approx(el, rel=1e-4, abs=1e-4)
    assert grads(m)
    with pytest.raises(UserError, match="only supported by cross_entropy"):
        bad = dict(rl[1], target_tokens=np.stack([rl[1]["target_tokens"]] * 2, 1))
        bad["logprobs"] = np.stack([bad["logprobs"]] * 2, 1)
        bad["advantages"] = np.stack([bad["advantages"]] * 2, 1)
        run(m, [bad], loss_fn="ppo")


def test_optimizer_semantics(make_model):
    m = make_model()
    before = {n: p.detach().clone() for n, p in m.engine.named_params}
    met = step(m)["metrics"]  # no gradients: nothing moves
    assert met["grad_norm:mean"] == 0.0 and m.engine.optimizer_steps == 0
    assert all(torch.equal(before[n], p) for n, p in m.engine.named_params)
    run(m, sft_batch(0))
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.engine.params if p.grad is not None])))
    met = step(m, grad_clip_norm=norm / 10, weight_decay=0.1)["metrics"]
    assert met["grad_norm:mean"] == pytest.approx(norm, rel=1e-5) and met["grad_clipped:mean"] == 1.0
    assert m.engine.optimizer_steps == 1
    g = m.engine.optimizer.param_groups[0]
    assert g["weight_decay"] == 0.1 and g["lr"] == 1e-2
    assert any(not torch.equal(before[n], p) for n, p in m.engine.named_params)
    with pytest.raises(UserError, match="grad_clip_norm"):
        step(m, grad_clip_norm=-1.0)


def test_checkpoint_roundtrip_and_layout_mismatch(make_model, tmp_path):
    m = make_model(rank=4)
    run(m, sft_batch(0))
    step(m)
    out = m.save(op_bodies.SaveBody(checkpoint_kind="weights", storage_prefix="c/w", name="w"), seq_id=3)
    assert out.result["path"] == "tinker://s:train:0/weights/w"
    loaded = ckpt.read_checkpoint(m.store, "c/w", "tinker://s:train:0/weights/w", True)
    assert loaded.lora == m.lora and loaded.meta.optimizer_step == 1 and loaded.optimizer
    # the live model accepts it back; a model with another rank refuses it before changing anything
    m.load(op_bodies.LoadWeightsBody(storage_prefix="c/w", tinker_path="tinker://x/weights/w", optimizer=True))
    other = make_model(rank=2)
    before = {n: p.detach().clone() for n, p in other.engine.named_params}
    with pytest.raises(UserError, match="does not match"):
        other.load(op_bodies.LoadWeightsBody(storage_prefix="c/w", tinker_path="tinker://x/weights/w", optimizer=True))
    assert all(torch.equal(before[n], p) for n, p in other.engine.named_params)
    # sampler checkpoints have no optimizer state to restore
    m.save(op_bodies.SaveBody(checkpoint_kind="sampler_weights", storage_prefix="c/s", name="s"), seq_id=4)
    with pytest.raises(UserError, match="no optimizer state"):
        ckpt.read_checkpoint(m.store, "c/s", "tinker://x/sampler_weights/s", True)


def test_lora_settings_defaults_and_targets(make_model):
    s = LoraSettings.resolve(
        op_bodies.LoraSpec(rank=16, seed=None, train_attn=False, train_mlp=True, train_unembed=False)
    )
    assert s.alpha == 32.0 and s.seed >= 0 and s.target_modules() == ["gate_proj", "up_proj", "down_proj"]
    with pytest.raises(UserError, match="at least one"):
        LoraSettings.resolve(op_bodies.LoraSpec(train_attn=False, train_mlp=False, train_unembed=False))
    with pytest.raises(UserError, match="rank"):
        LoraSettings.resolve(op_bodies.LoraSpec(rank=0))
    m = make_model(train_attn=False, train_unembed=False)
    names = {n for n, _ in m.engine.named_params}
    assert names and all(".mlp." in n for n in names)


def test_empty_and_malformed_requests(make_model):
    m = make_model()
    out = pb.ForwardBackwardOutput.FromString(m.forward_backward(fwd_request([])))
    assert out.metrics["loss:sum"] == 0.0 and len(out.loss_fn_outputs) == 0
    with pytest.raises(UserError, match="empty"):
        run(
            m,
            [
                {
                    "tokens": np.zeros(0, np.int64),
                    "target_tokens": np.zeros(0, np.int64),
                    "weights": np.zeros(0, np.float32),
                }
            ],
        )
