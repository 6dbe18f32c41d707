"""Run snapshots in process: capture/restore is exact (weights, initial values, gradients with
their normalization counters, AdamW, step count, RNG), the object-store format commits
atomically through its manifest, and a worker that lost its run cannot move the manifest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from data_plane.storage.local import LocalDirStore
from data_plane.trainer import snapshots
from data_plane.trainer.training import TrainingModel, seed_of
from data_plane.wire import op_bodies
from tests.trainer.loops_support import grads, loops_run, new_model, params, step
from tests.trainer.test_model_reset import _data

PREFIX = "snapshots/org/run-1"


@pytest.fixture
def make_model(tiny_model, tmp_path):
    return lambda **kw: new_model(tiny_model, tmp_path / "store", **kw)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _roundtrip(m: TrainingModel, into: TrainingModel, next_seq: int = 7) -> snapshots.RunSnapshot:
    snap = snapshots.RunSnapshot.decode(snapshots.capture(m, "run-1", next_seq).encode())
    snapshots.restore(into, snap)
    return snap


def test_restore_continues_bit_for_bit(make_model) -> None:
    a = make_model(rank=4)
    loops_run(a, _data(0))
    step(a)
    loops_run(a, _data(1))  # gradients accumulated, not stepped yet
    torch.manual_seed(1234)
    b = make_model(rank=4, create=False)
    snap = _roundtrip(a, b)
    assert snap.next_seq == 7 and snap.optim_steps == 1 and snap.accumulation == a.engine.accumulation
    assert _same(params(a), params(b)) and _same(grads(a), grads(b))
    assert b.engine.accumulation == a.engine.accumulation and b.optimizer_steps == 1
    assert torch.equal(torch.random.get_rng_state(), snap.tensors["rng::cpu"])
    # both go on identically: the step on the restored gradients, then more training
    step(a)
    step(b)
    assert _same(params(a), params(b))
    la, lb = loops_run(a, _data(2))["loss"], loops_run(b, _data(2))["loss"]
    assert la == lb
    # init_trainer on the restored model returns to the same initial values
    a.init_trainer(4)
    b.init_trainer(4)
    assert _same(params(a), params(b))


def test_a_model_without_an_adapter_restores_its_seq0_error(make_model) -> None:
    a = make_model(create=False)
    snap = snapshots.RunSnapshot.decode(snapshots.capture(a, "run-1", 1, ("bad rank", "user")).encode())
    assert snap.lora is None and snap.seq0_error == ("bad rank", "user")
    b = make_model(create=False)
    snapshots.restore(b, snap)
    assert not b.created


def test_the_default_seed_comes_from_the_model_id(make_model) -> None:
    a = make_model(create=False)
    b = make_model(create=False)
    for m in (a, b):
        m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=4)))
    assert a.lora is not None and a.lora.seed == seed_of("s:train:0")
    assert _same(params(a), params(b))  # a replayed create builds the same adapter


def test_store_commit_is_atomic_and_keeps_one_state_file(make_model, tmp_path) -> None:
    store = LocalDirStore(tmp_path / "snaps")
    m = make_model(rank=4)
    assert snapshots.read(store, PREFIX, "run-1") is None
    first = snapshots.write(store, PREFIX, snapshots.capture(m, "run-1", 1))
    step_loss = loops_run(m, _data(0))["loss"]
    assert step_loss > 0
    step(m)
    second = snapshots.write(store, PREFIX, snapshots.capture(m, "run-1", 3))
    assert snapshots.read_manifest(store, PREFIX) == second
    states = [o.key for o in store.list(PREFIX + "/") if o.key.endswith(snapshots.STATE_FILE)]
    assert states == [second.key] and first.key != second.key  # the older one is gone
    got = snapshots.read(store, PREFIX, "run-1")
    assert got is not None and got.next_seq == 3 and got.optim_steps == 1

    # a worker that lost the run, or is behind the current manifest, commits nothing
    with pytest.raises(snapshots.Superseded):
        snapshots.write(store, PREFIX, snapshots.capture(m, "run-1", 5), owns=lambda: False)
    with pytest.raises(snapshots.Superseded):
        snapshots.write(store, PREFIX, snapshots.capture(m, "run-1", 2))
    assert snapshots.read_manifest(store, PREFIX) == second
    assert [o.key for o in store.list(PREFIX + "/") if o.key.endswith(snapshots.STATE_FILE)] == [second.key]

    # another run's snapshot, and a corrupt or missing state file, are clear errors
    with pytest.raises(snapshots.SnapshotError, match="belongs to run"):
        snapshots.read(store, PREFIX, "run-2")
    store.put_bytes(second.key, b"not a safetensors file")
    with pytest.raises(snapshots.SnapshotError, match="unreadable"):
        snapshots.read(store, PREFIX, "run-1")
    store.delete_prefix(second.key)
    with pytest.raises(snapshots.SnapshotError, match="missing"):
        snapshots.read(store, PREFIX, "run-1")


def test_a_snapshot_that_does_not_fit_leaves_no_adapter(make_model) -> None:
    a = make_model(rank=4)
    snap = snapshots.capture(a, "run-1", 1)
    snap.tensors = {k: v for k, v in snap.tensors.items() if not k.startswith("initial::")}
    b = make_model(create=False)
    with pytest.raises(snapshots.SnapshotError, match="initial values"):
        snapshots.restore(b, snap)
    assert not b.created
    b.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=4, seed=1)))  # the base is bare again
    assert b.created


def test_a_snapshot_keeps_the_runs_activation_checkpointing(make_model) -> None:
    """Seq 0 is not replayed once a snapshot covers it: the snapshot carries the run's mode, and
    a run that chose none stays without one (the restoring worker's default applies)."""
    chose = make_model(rank=4, checkpointing="on")  # this worker's default: off
    into = make_model(create=False)
    snap = _roundtrip(chose, into)
    assert snap.activation_checkpointing == "on" and into.run_checkpointing == "on"
    assert into.engine is not None and into.engine.checkpointing.mode == "on"
    none = make_model(rank=4)
    into = make_model(create=False, default_checkpointing="on")
    snap = _roundtrip(none, into)
    assert snap.activation_checkpointing is None and into.run_checkpointing is None
    assert into.engine is not None and into.engine.checkpointing.mode == "on"
    # a snapshot written before the option existed has no such fact: none
    old = snapshots.capture(chose, "run-1", 3)
    facts = {k: v for k, v in old.facts().items() if k != "activation_checkpointing"}
    raw = st_save(old.tensors, metadata={"openloops": json.dumps(facts)})
    assert snapshots.RunSnapshot.decode(raw).activation_checkpointing is None
    old.activation_checkpointing = "sometimes"
    with pytest.raises(snapshots.SnapshotError, match="bad facts"):
        snapshots.RunSnapshot.decode(old.encode())
