"""A real worker subprocess on the tiny model, driven only through the Redis contract.

One scripted run (worker A) is checked step by step against the same script run in-process
without the bad inputs (the reference). A second worker (B) is created from A's checkpoint
and must continue exactly like A did.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results
from tinker.proto import response_conv

from data_plane.storage.local import LocalDirStore
from data_plane.trainer import checkpoint as ckpt
from data_plane.trainer.model import load_base
from data_plane.trainer.training import TrainingModel
from data_plane.wire import op_bodies
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.queue import (
    FUTURE_DONE_CHANNEL,
    ErrorCategory,
    FutureState,
    OpKind,
    parse_done_message,
    run_pending_key,
    run_state_key,
)
from data_plane.wire.worker_config import StoreSpec, TrainerLaunch
from tests.trainer.conftest import REPO, Driver, fwd_request, sft_batch

pytestmark = pytest.mark.slow  # starts trainer worker processes

LR = 1e-2
TRAIN = sft_batch(1)  # SFT on the same batch every step: the loss must fall
EVAL = sft_batch(99, n=3)
TOL = dict(rtol=1e-5, atol=1e-5)


def logprobs_of(out: pb.ForwardBackwardOutput) -> list[np.ndarray]:
    sdk = response_conv.deserialize_forward_backward_output(out.SerializeToString())
    return [o["logprobs"].to_numpy() for o in sdk.loss_fn_outputs]


class Reference:
    """The same script, in-process, without any bad input."""

    def __init__(self, tiny_model: Path, store_root: Path) -> None:
        base = load_base(str(tiny_model), torch.device("cpu"), torch.float32)
        self.m = TrainingModel(
            model_id="ref",
            base_model_name="openloops/tiny",
            base=base,
            device=torch.device("cpu"),
            store=LocalDirStore(store_root),
            max_seq_len=256,
            microbatch_tokens=64,
        )
        self.m.create(op_bodies.CreateBody(op_bodies.LoraSpec(rank=8, seed=0)))

    def step(self) -> float:
        out = pb.ForwardBackwardOutput.FromString(self.m.forward_backward(fwd_request(TRAIN)))
        self.m.optim_step(op_bodies.OptimStepBody(op_bodies.AdamSpec(learning_rate=LR)))
        return out.metrics["loss:sum"]

    def eval(self) -> list[np.ndarray]:
        return logprobs_of(
            pb.ForwardBackwardOutput.FromString(self.m.forward_backward(fwd_request(EVAL, forward_only=True)))
        )


def bad_ops(d) -> list[tuple[str, str]]:
    """(request id, expected message fragment) for inputs that must fail as user errors."""
    good = sft_batch(7, n=1)[0]
    n = len(good["tokens"])
    ops = []

    def fwd(datums, match, **kw):
        ops.append((d.send(OpKind.FORWARD_BACKWARD, fwd_request(datums, **kw)), match))

    fwd([good], "unknown loss_fn", loss_fn="nope")
    fwd([{**good, "tokens": np.r_[good["tokens"][:-1], 5000]}], "outside the vocabulary")
    fwd([{**good, "target_tokens": np.r_[good["target_tokens"][:-1], -1]}], "outside the vocabulary")
    long = np.arange(257) % 2000 + 6
    fwd([{"tokens": long, "target_tokens": long, "weights": np.ones(257, np.float32)}], "max_seq_len")
    fwd([{"tokens": good["tokens"], "target_tokens": good["target_tokens"]}], "missing 'weights'")
    fwd([{**good, "weights": good["weights"][:-1]}], "shape")
    fwd([{**good, "weights": np.where(np.arange(n) == 4, np.nan, 1.0).astype(np.float32)}], "NaN")
    fwd([good], "unknown loss_fn_config", config={"beta": 0.1})
    fwd(
        [{**good, "logprobs": np.zeros(n, np.float32), "advantages": np.ones(n, np.float32)}],
        "ratio bounds",
        loss_fn="ppo",
        config={"clip_low_threshold": 1.5, "clip_high_threshold": 1.2},
    )
    # importance sampling whose ratio overflows in the *second* micro-batch: the first one's
    # backward already ran, so the worker must restore the gradients it had before the call.
    big = sft_batch(8, n=1, length=40)[0]
    rl_ok = {
        "tokens": big["tokens"],
        "target_tokens": big["target_tokens"],
        "logprobs": np.zeros(40, np.float32),
        "advantages": np.ones(40, np.float32),
    }
    rl_bad = {
        "tokens": good["tokens"],
        "target_tokens": good["target_tokens"],
        "logprobs": np.full(n, -100.0, np.float32),
        "advantages": np.ones(n, np.float32),
    }
    fwd([rl_bad, rl_ok], "not finite", loss_fn="importance_sampling")
    img = pb.ForwardBackwardRequest(loss_fn="cross_entropy")
    c = img.data.add().model_input.add()
    c.image.data, c.image.format = b"\x89PNG", "png"
    ops.append((d.send(OpKind.FORWARD_BACKWARD, img.SerializeToString()), "image"))
    ops.append((d.send(OpKind.FORWARD_BACKWARD, b"\xff\xff\xff"), "protobuf"))
    ops.append((d.optim(learning_rate=float("nan")), "learning_rate"))
    ops.append((d.optim(beta1=1.5), "beta1"))
    ops.append((d.create(), "only valid as seq 0"))
    ops.append((d.send(OpKind.OPTIM_STEP, b'{"adam": {"lr": 1}}'), "malformed op body"))
    return ops


def test_worker_end_to_end(start_worker, tiny_model, store_root, tmp_path):
    a = start_worker("wa")
    b = start_worker("wb")  # starts loading now; gets its seq 0 once A has saved

    # seq 1 arrives before seq 0: nothing runs until create lands
    f1 = a.send(OpKind.FORWARD_BACKWARD, fwd_request(TRAIN), seq=1)
    c0 = a.send(OpKind.CREATE, op_bodies.encode(op_bodies.CreateBody(op_bodies.LoraSpec(rank=8, seed=0))), seq=0)
    a.seq = 2
    assert a.ok_json(c0) == {"model_id": a.model_id, "type": "create_model"}
    st = a.wait_state("ready")
    assert int(st["pid"]) == a.proc.pid and float(st["updated_at"]) > 0

    out1 = a.ok_proto(f1)
    # the SDK decodes it and merges metrics (every key "name:reduction")
    sdk = response_conv.deserialize_forward_backward_output(out1.SerializeToString())
    merged = combine_fwd_bwd_output_results([sdk])
    assert "loss:sum" in merged.metrics and all(k.count(":") == 1 for k in out1.metrics)
    batch1 = TRAIN
    assert [len(o["logprobs"].to_numpy()) for o in sdk.loss_fn_outputs] == [len(x["tokens"]) for x in batch1]
    expected = -sum(float((o["logprobs"].to_numpy() * x["weights"]).sum()) for o, x in zip(sdk.loss_fn_outputs, batch1))
    assert out1.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(
        sdk.loss_fn_outputs[0]["elementwise_loss"].to_numpy(),
        -sdk.loss_fn_outputs[0]["logprobs"].to_numpy() * batch1[0]["weights"],
        **TOL,
    )

    # forward_only between forward_backward and optim_step must not touch the gradients
    a.ok_proto(a.fwd(EVAL, forward_only=True))
    losses = [out1.metrics["loss:sum"], None, None]
    # the answer's wake-up message carries the (small) answer, and the run's progress is
    # written in the same transaction: whoever is woken reads it already there
    sub = a.r.pubsub()
    sub.subscribe(FUTURE_DONE_CHANNEL)
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    m1 = a.optim(learning_rate=LR)
    msg = sub.get_message(timeout=60)
    while msg is not None and parse_done_message(msg["data"])[0] != m1:
        msg = sub.get_message(timeout=60)
    assert msg is not None
    progress = a.r.hgetall(run_state_key(a.run_id))
    assert int(progress[b"next_seq"]) == a.seq and int(progress[b"optim_steps"]) == 1
    rid, carried = parse_done_message(msg["data"])
    assert carried is not None and carried == a.result(m1)
    sub.close()
    assert a.ok_json(m1)["metrics"]["learning_rate:mean"] == LR

    # step 2 with every kind of bad input between forward_backward and optim_step
    f2 = a.fwd(TRAIN)
    bad = bad_ops(a)
    m2 = a.optim(learning_rate=LR)
    losses[1] = a.ok_proto(f2).metrics["loss:sum"]
    for rid, match in bad:
        res = a.result(rid)
        assert res.state == FutureState.FAILED, (match, res.body)
        assert res.category == ErrorCategory.USER, (match, res.body)
        assert match in json.loads(res.body)["error"], (match, res.body)
    metrics = a.ok_json(m2)["metrics"]
    assert metrics["learning_rate:mean"] == LR and metrics["grad_norm:mean"] > 0

    # step 3 with optim_step (seq k+1) arriving before its forward_backward (seq k)
    k = a.seq
    m3 = a.send(
        OpKind.OPTIM_STEP, op_bodies.encode(op_bodies.OptimStepBody(op_bodies.AdamSpec(learning_rate=LR))), seq=k + 1
    )
    f3 = a.send(OpKind.FORWARD_BACKWARD, fwd_request(TRAIN), seq=k)
    a.seq = k + 2
    losses[2] = a.ok_proto(f3).metrics["loss:sum"]
    a.ok_json(m3)

    # the same script in-process, without bad inputs: identical losses
    ref = Reference(tiny_model, tmp_path / "ref-store")
    ref_losses = [ref.step() for _ in range(3)]
    np.testing.assert_allclose(losses, ref_losses, **TOL)
    assert losses[0] > losses[1] > losses[2]

    # checkpoints
    prefix = "runs/wa/weights/ckpt-3"
    sw = a.save("weights", prefix, "ckpt-3", ttl_seconds=7200, user_metadata={"k": "v"})
    ss = a.save("sampler_weights", "runs/wa/sampler_weights/s3", "s3")
    su = a.save("sampler_weights", "runs/wa/sampler_weights/snap-5", None, sampling_session_seq_id=5)
    sbad = a.save("weights", "runs/wa/weights/x", None)
    eval3 = logprobs_of(a.ok_proto(a.fwd(EVAL, forward_only=True)))
    for got, want in zip(eval3, ref.eval()):
        np.testing.assert_allclose(got, want, **TOL)

    store = LocalDirStore(store_root)
    cw = a.completion(sw)
    assert cw.error is None and cw.kind == OpKind.SAVE_WEIGHTS
    assert cw.result == {"path": f"tinker://{a.model_id}/weights/ckpt-3", "type": "save_weights"}
    assert (cw.checkpoint_kind, cw.checkpoint_name, cw.storage_prefix) == ("weights", "ckpt-3", prefix)
    assert cw.ttl_seconds == 7200 and cw.user_metadata == {"k": "v"}
    assert cw.lora_config == {
        "rank": 8,
        "alpha": 32.0,
        "seed": 0,
        "train_attn": True,
        "train_mlp": True,
        "train_unembed": True,
    }
    listed = {o.key: o.size_bytes for o in store.list(prefix + "/")}
    assert {f.relative_path for f in cw.files} == {
        ckpt.ADAPTER_CONFIG,
        ckpt.ADAPTER_WEIGHTS,
        ckpt.OPTIMIZER_STATE,
        ckpt.METADATA,
    }
    assert listed == {f"{prefix}/{f.relative_path}": f.size_bytes for f in cw.files}
    meta = json.loads(store.get_bytes(f"{prefix}/{ckpt.METADATA}"))
    assert meta["optimizer_step"] == 3 and meta["base_model"] == "openloops/tiny" and meta["kind"] == "weights"

    cs = a.completion(ss)
    assert cs.result == {"path": f"tinker://{a.model_id}/sampler_weights/s3", "type": "save_weights_for_sampler"}
    assert {f.relative_path for f in cs.files} == {ckpt.ADAPTER_CONFIG, ckpt.ADAPTER_WEIGHTS, ckpt.METADATA}
    cu = a.completion(su)
    assert cu.result == {} and cu.sampling_session_seq_id == 5 and cu.checkpoint_name is None and cu.files
    cb = a.completion(sbad)
    assert cb.error and cb.category == ErrorCategory.USER and not cb.files

    # step 4 on A (the uninterrupted run)
    f4, m4 = a.fwd(TRAIN), a.optim(learning_rate=LR)
    loss4_a = a.ok_proto(f4).metrics["loss:sum"]
    a.ok_json(m4)
    eval4_a = logprobs_of(a.ok_proto(a.fwd(EVAL, forward_only=True)))

    # worker B: create-via-load with optimizer, then the same step 4: identical
    load = op_bodies.LoadWeightsBody(storage_prefix=prefix, tinker_path=cw.result["path"], optimizer=True)
    lb = b.send(OpKind.LOAD_WEIGHTS, op_bodies.encode(load))
    assert b.ok_json(lb) == {"type": "load_weights", "path": cw.result["path"], "model_id": b.model_id}
    b_eval3 = logprobs_of(b.ok_proto(b.fwd(EVAL, forward_only=True)))
    for got, want in zip(b_eval3, eval3):
        np.testing.assert_allclose(got, want, **TOL)
    f4b, m4b = b.fwd(TRAIN), b.optim(learning_rate=LR)
    assert b.ok_proto(f4b).metrics["loss:sum"] == pytest.approx(loss4_a, rel=1e-6)
    b.ok_json(m4b)
    for got, want in zip(logprobs_of(b.ok_proto(b.fwd(EVAL, forward_only=True))), eval4_a):
        np.testing.assert_allclose(got, want, **TOL)

    # legacy load_weights (seq > 0) on B goes back to the step-3 weights
    lb2 = b.send(OpKind.LOAD_WEIGHTS, op_bodies.encode(load))
    b.ok_json(lb2)
    for got, want in zip(logprobs_of(b.ok_proto(b.fwd(EVAL, forward_only=True))), eval3):
        np.testing.assert_allclose(got, want, **TOL)
    # loading a checkpoint that does not exist is a user error and changes nothing
    missing = op_bodies.LoadWeightsBody(
        storage_prefix="runs/nope/weights/x", tinker_path="tinker://nope/weights/x", optimizer=True
    )
    res = b.result(b.send(OpKind.LOAD_WEIGHTS, op_bodies.encode(missing)))
    assert res.state == FutureState.FAILED and res.category == ErrorCategory.USER

    # peft loads the sampler adapter, and it computes the same logprobs as the worker did
    from peft import PeftModel

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for f in cs.files:
        store.download_file(f"runs/wa/sampler_weights/s3/{f.relative_path}", adapter_dir / f.relative_path)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "openloops/tiny" and cfg["r"] == 8 and cfg["lora_alpha"] == 32
    assert set(cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }
    peft_model = PeftModel.from_pretrained(
        load_base(str(tiny_model), torch.device("cpu"), torch.float32), str(adapter_dir)
    )
    with torch.no_grad():
        for d, want in zip(EVAL, eval3):
            logits = peft_model(input_ids=torch.from_numpy(d["tokens"])[None]).logits[0]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.from_numpy(d["target_tokens"])[:, None])[:, 0]
            np.testing.assert_allclose(lp.numpy(), want, **TOL)

    # every future the worker writes left the pending set (save futures are the control plane's)
    assert a.r.smembers(run_pending_key("wa")) == {r.encode() for r in (sw, ss, su, sbad)}

    # shutdown: state "stopped", clean exit
    a.send(OpKind.SHUTDOWN, b"", seq=10**9)
    assert a.proc.wait(30) == 0
    assert a.state()["state"] == "stopped"

    # a restarted worker of the same run resumes it exactly where A stopped: the snapshot A
    # wrote at shutdown is restored, and the same eval gives the same logprobs
    snap_seq = int(a.run_state()["snapshot_seq"])
    assert snap_seq == a.seq
    again = start_worker("wa")
    again.seq, again._n = a.seq, a._n
    again.wait_state("ready")
    for got, want in zip(logprobs_of(again.ok_proto(again.fwd(EVAL, forward_only=True))), eval4_a):
        np.testing.assert_allclose(got, want, **TOL)
    st = again.run_state()
    assert st["state"] == "attached" and st["resumes"] == "1" and st["optim_steps"] == "4"


def test_a_run_without_an_op_log_is_refused(start_worker, valkey_url):
    """A run whose ops a worker executed without keeping them (next_seq > 0, not marked durable)
    cannot be continued: the run fails with a reason, the worker stays ready."""
    r = redis.Redis.from_url(valkey_url)
    r.hset(run_state_key("wold"), mapping={"next_seq": 3, "state": "attached"})
    w = start_worker("wold")
    w.wait_state("ready")
    deadline = time.monotonic() + 60
    while (st := w.run_state()).get("state") != "failed":
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert "kept no op log" in st["detail"] and "up to seq 2" in st["detail"]
    assert w.proc.poll() is None


def test_base_model_load_failure_sets_failed_state(valkey_url, store_root, tmp_path):
    launch = TrainerLaunch(
        deployment_id="dep-broken",
        base_model="nope",
        model_source=str(tmp_path / "missing"),
        redis_url=valkey_url,
        store=StoreSpec(kind="local", root=str(store_root)),
        device="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "data_plane.trainer"],
        cwd=REPO,
        env={**os.environ, **launch.to_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    st = Driver(redis.Redis.from_url(valkey_url), "broken", "broken", "dep-broken").state()
    assert st["state"] == "failed" and "loading base model" in st["detail"]
    assert math.isfinite(float(st["updated_at"])) and int(st["pid"]) > 0
