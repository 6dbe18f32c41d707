"""Run lifecycle on one worker: init_trainer (back to the adapter's initial values), detach
(bare base, ready for the next run's create), step counters in load results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_plane.trainer import checkpoint as ckpt
from data_plane.trainer.errors import UserError
from data_plane.wire import op_bodies
from tests.trainer.conftest import sft_batch
from tests.trainer.loops_support import grads, loops_run, new_model, params, step


@pytest.fixture
def make_model(tiny_model, tmp_path):
    return lambda **kw: new_model(tiny_model, tmp_path / "store", **kw)


def _data(seed: int = 0) -> list[dict]:
    out = []
    for d in sft_batch(seed, n=2):
        t = d["target_tokens"].copy()
        t[:3] = -100
        out.append({"tokens": d["tokens"], "target_tokens": t})
    return out


def _train_step(m) -> float:
    loss = loops_run(m, _data())["loss"]
    step(m)
    return loss


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lora_modules(m) -> int:
    return sum(1 for n, _ in m.base.named_modules() if "lora_" in n)


def test_init_trainer_restores_the_initial_state(make_model):
    m = make_model(rank=4)
    initial = params(m)
    first = _train_step(m)
    assert m.optimizer_steps == 1 and not _same(initial, params(m))
    loops_run(m, _data(1))  # pending gradients and normalization counters
    assert grads(m) and m.engine.accumulation[1] > 0
    assert m.init_trainer(4) == {"step": 0, "lora_rank": 4}
    assert _same(initial, params(m))
    assert grads(m) == {} and m.engine.accumulation == (None, 0)
    assert m.optimizer_steps == 0 and not m.engine.optimizer.state
    # the run starts over exactly: the same first step as before
    assert _train_step(m) == pytest.approx(first, rel=1e-6)
    after_first = params(m)
    fresh = make_model(rank=4)
    _train_step(fresh)
    for k, v in params(fresh).items():
        torch.testing.assert_close(after_first[k], v, rtol=1e-6, atol=1e-7)


def test_init_trainer_errors(make_model):
    m = make_model(rank=4)
    with pytest.raises(UserError, match="does not match this trainer's LoRA rank 4"):
        m.init_trainer(8)
    with pytest.raises(UserError, match="integer"):
        m.init_trainer(True)
    bare = make_model(create=False)
    with pytest.raises(UserError, match="not been created"):
        bare.init_trainer(4)
    assert bare.optimizer_steps == 0


def test_detach_then_create_again_is_a_fresh_run(make_model):
    fresh = make_model(rank=4, seed=11)
    fresh_initial = params(fresh)
    fresh_loss = _train_step(fresh)

    m = make_model(rank=8, seed=5)
    _train_step(m)
    m.detach()
    assert not m.created and m.peft is None and m.optimizer_steps == 0
    assert _lora_modules(m) == 0 and not hasattr(m.base, "peft_config")
    with pytest.raises(UserError, match="not been created"):
        m.loops_forward_backward(b"")
    m.detach()  # no adapter: nothing to do
    m.model_id, m.max_seq_len = "next:train:0", 256  # the worker switches runs
    assert m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=4, seed=11))) == {
        "model_id": "next:train:0",
        "type": "create_model",
    }
    assert _same(fresh_initial, params(m))
    assert _train_step(m) == pytest.approx(fresh_loss, rel=1e-6)
    assert m.optimizer_steps == 1


def test_create_from_checkpoint_initial_values_and_steps(make_model):
    src = make_model(rank=4)
    _train_step(src)
    _train_step(src)
    src.save(op_bodies.SaveBody(checkpoint_kind="weights", storage_prefix="c/w", name="w"), seq_id=3)
    saved = params(src)
    body = op_bodies.LoadWeightsBody(storage_prefix="c/w", tinker_path="tinker://s:train:0/weights/w", optimizer=True)

    m = make_model(create=False)
    res = m.create_from_checkpoint(body)
    assert res["step"] == 2 and m.optimizer_steps == 2 and res["type"] == "load_weights"
    assert _same(saved, params(m))
    _train_step(m)
    assert m.optimizer_steps == 3
    assert m.init_trainer(4) == {"step": 0, "lora_rank": 4}
    assert _same(saved, params(m)) and m.optimizer_steps == 0
    # the live-model load reports the steps after it
    assert m.load(body)["step"] == 2
    no_opt = op_bodies.LoadWeightsBody(
        storage_prefix="c/w", tinker_path="tinker://s:train:0/weights/w", optimizer=False
    )
    assert m.load(no_opt)["step"] == 2  # the weights' own step count, as before


def test_failed_create_from_checkpoint_leaves_a_bare_base(make_model):
    src = make_model(rank=4)
    src.save(op_bodies.SaveBody(checkpoint_kind="weights", storage_prefix="c/bad", name="bad"), seq_id=1)
    meta_key = ckpt.key("c/bad", ckpt.METADATA)
    meta = json.loads(src.store.get_bytes(meta_key))
    meta["lora"]["rank"] = 8  # the adapter tensors are rank 4: loading them fails after attaching
    src.store.put_bytes(meta_key, json.dumps(meta).encode())
    m = make_model(create=False)
    with pytest.raises(UserError, match="shape"):
        m.create_from_checkpoint(
            op_bodies.LoadWeightsBody(storage_prefix="c/bad", tinker_path="tinker://x/weights/bad", optimizer=False)
        )
    assert not m.created and _lora_modules(m) == 0
    m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=4, seed=3)))
    assert _same(params(src), params(m))


def test_max_seq_len_is_assignable(make_model):
    m = make_model()
    m.max_seq_len = 8
    with pytest.raises(UserError, match="max_seq_len 8"):
        loops_run(m, [{"tokens": np.arange(6, 20), "target_tokens": np.arange(7, 21)}])


def test_each_run_trains_with_its_own_activation_checkpointing(make_model):
    """The mode comes with seq 0 (create or create-from-checkpoint); a run without one gets the
    worker's default; detach forgets it; a mode that is none of them fails seq 0 cleanly."""
    m = make_model(create=False, default_checkpointing="auto")
    for choice, mode in (("on", "on"), (None, "auto"), ("off", "off")):
        m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=4, seed=3), activation_checkpointing=choice))
        assert m.engine is not None and m.engine.checkpointing.mode == mode and m.run_checkpointing == choice
        if choice == "on":
            m.save(op_bodies.SaveBody(checkpoint_kind="weights", storage_prefix="c/ac", name="ac"), seq_id=1)
        m.detach()
        assert m.run_checkpointing is None
    load = op_bodies.LoadWeightsBody(
        storage_prefix="c/ac",
        tinker_path="tinker://s:train:0/weights/ac",
        optimizer=True,
        activation_checkpointing="on",
    )
    m.create_from_checkpoint(load)
    assert m.engine is not None and m.engine.checkpointing.mode == "on" and m.run_checkpointing == "on"
    m.detach()
    with pytest.raises(UserError, match="must be one of auto, on, off"):
        m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=4), activation_checkpointing="sometimes"))
    assert not m.created and m.run_checkpointing is None
