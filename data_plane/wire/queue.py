"""The Redis contract between the control plane and trainer workers.

Both sides import this module; nothing else defines key names or envelope shapes.

A trainer worker serves one Loops deployment and executes one run at a time: the control
plane appends an :class:`AttachEvent` to :func:`deployment_runs_stream` to put a run on it
(the first run of a new deployment, or a run that reuses a warm deployment). The worker keeps
its base model loaded, drops the previous run's adapter and optimizer, and reads the new run's
op stream from its start.

Flow of one training op (Tinker or Loops; the envelope's ``dialect`` says whose conventions
its input and result follow):

1. The API server assigns a ``request_id``, claims ``(model_id, seq_id)`` with ``SET NX`` on
   :func:`seq_claim_key` (a repeated submission gets the first request's id back), records the
   future as pending (:func:`future_key`, state ``pending``) and appends an :class:`OpEnvelope`
   to the run's stream :func:`ops_stream`.
2. The worker reads its stream, buffers envelopes by ``seq_id`` and executes them strictly in
   order (seq 0 is the model-creating op: ``create`` or ``load_weights``).
3. For ops whose result needs no control-plane bookkeeping the worker writes the result itself
   (:func:`write_result` semantics: hash at :func:`future_key`, then ``PUBLISH`` on
   :data:`FUTURE_DONE_CHANNEL` of :func:`done_message`: the result itself when it is small).
   For ops that create checkpoints it appends a :class:`Completion` to
   :data:`COMPLETIONS_STREAM`; the control plane records the checkpoint row first and only
   then completes the future, so a path returned to a client is always listed.
4. The worker reports its lifecycle in the hash :func:`worker_state_key` of its deployment
   (``loading``, ``ready``, ``failed`` with a ``detail``; the attached ``run_id``; GPU use) and
   each run's progress in :func:`run_state_key` (``next_seq``, ``optim_steps``, ``state``
   restoring | attached | failed | detached, ``detail``; ``snapshot_seq`` and ``resumes`` for
   durability, see :mod:`data_plane.trainer.snapshotter`), which the controller reads.

A run is durable: its op stream keeps every executed op until a snapshot of the run's state in
the object store covers it, so a new worker continues the run exactly
(docs/durability.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, cast

PREFIX = "openloops"
FUTURE_DONE_CHANNEL = f"{PREFIX}:future-done"
COMPLETIONS_STREAM = f"{PREFIX}:completions"
COMPLETIONS_GROUP = "control-plane"
FUTURE_TTL_SECONDS = 3600
# one small entry per executed training op (:class:`data_plane.wire.telemetry.OpTelemetry`),
# written in the same round trip as the op's answer; the control plane's TelemetryConsumer
# (consumer group below) stores them as per-step rows. Trimmed to about this many entries, so
# a control plane that is down for long loses the oldest metrics rather than Redis memory.
TELEMETRY_STREAM = f"{PREFIX}:telemetry"
TELEMETRY_GROUP = "control-plane"
TELEMETRY_MAXLEN = 200_000


def ops_stream(run_id: str) -> str:
    return f"{PREFIX}:ops:{run_id}"


def future_key(request_id: str) -> str:
    return f"{PREFIX}:future:{request_id}"


def seq_claim_key(model_id: str, seq_id: int) -> str:
    return f"{PREFIX}:seq:{model_id}:{seq_id}"


def run_pending_key(run_id: str) -> str:
    """Set of request ids still pending for a run (failed together if its worker dies)."""
    return f"{PREFIX}:pending:{run_id}"


def worker_state_key(deployment_id: str) -> str:
    """The trainer worker of a deployment: lifecycle, attached run, GPU use."""
    return f"{PREFIX}:worker:{deployment_id}"


def run_state_key(run_id: str) -> str:
    """One run's progress on its deployment's worker."""
    return f"{PREFIX}:run-state:{run_id}"


def deployment_runs_stream(deployment_id: str) -> str:
    """:class:`AttachEvent` entries: which run the deployment's worker executes."""
    return f"{PREFIX}:deployment-runs:{deployment_id}"


class OpKind(StrEnum):
    CREATE = "create"
    FORWARD_BACKWARD = "forward_backward"
    OPTIM_STEP = "optim_step"
    SAVE_WEIGHTS = "save_weights"
    SAVE_WEIGHTS_FOR_SAMPLER = "save_weights_for_sampler"
    SAVE_WEIGHTS_EXTERNAL = "save_weights_external"
    LOAD_WEIGHTS = "load_weights"
    # Loops init_trainer_server: reset the adapter to its initial values (JSON {"lora_rank"})
    INIT_TRAINER = "init_trainer"
    SHUTDOWN = "shutdown"
    # an op the control plane refused (bad input): it only fills its seq_id so that later
    # ops are not held back by the gap; the control plane already failed its future
    REJECTED = "rejected"


class Dialect(StrEnum):
    """Whose conventions an op follows: input validation, loss normalization, result shape."""

    TINKER = "tinker"
    LOOPS = "loops"


class RunState(StrEnum):
    RESTORING = "restoring"  # a worker restores the run's snapshot and replays its op log
    ATTACHED = "attached"
    FAILED = "failed"
    DETACHED = "detached"


class FutureState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class ErrorCategory(StrEnum):
    USER = "user"
    SERVER = "server"
    UNKNOWN = "unknown"


class WorkerState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


# Redis replies: every client here leaves ``decode_responses`` off, so keys and values come back
# as bytes. redis-py types them ``bytes | str`` (it cannot know which); these narrow a reply
# once, where it is read.
Fields = dict[bytes, bytes]
StreamEntry = tuple[bytes, Fields]


def fields_of(reply: Mapping[Any, Any] | None) -> Fields:
    """A hash (``HGETALL``) or stream entry's fields."""
    return cast("Fields", reply or {})


def stream_entries(reply: Any) -> list[StreamEntry]:
    """``XRANGE`` / ``XREVRANGE`` entries."""
    return cast("list[StreamEntry]", reply or [])


def xread_streams(reply: Any) -> list[tuple[bytes, list[StreamEntry]]]:
    """``XREAD`` / ``XREADGROUP``: (stream name, entries) per stream."""
    return cast("list[tuple[bytes, list[StreamEntry]]]", reply or [])


def text(value: bytes | str) -> str:
    """A key, member or value as text."""
    return value.decode() if isinstance(value, bytes) else value


# what ``HSET mapping=`` and ``XADD`` take (redis-py's ``Dict[FieldT, EncodableT]``)
RedisValue = bytes | bytearray | memoryview | str | int | float
OutFields = dict[RedisValue, RedisValue]


JSON_CONTENT = "application/json"
PROTOBUF_CONTENT = "application/x-protobuf"


@dataclass(frozen=True, slots=True)
class OpEnvelope:
    """One op on a run's stream.

    ``body`` is the op's payload: the raw ``ForwardBackwardRequest`` protobuf bytes for
    ``forward_backward``, otherwise UTF-8 JSON whose shape is documented per op in
    :mod:`data_plane.wire.op_bodies`.
    """

    request_id: str
    model_id: str
    seq_id: int
    kind: OpKind
    body: bytes
    dialect: Dialect = Dialect.TINKER

    def to_fields(self) -> OutFields:
        return {
            "request_id": self.request_id,
            "model_id": self.model_id,
            "seq_id": str(self.seq_id),
            "kind": self.kind.value,
            "body": self.body,
            "dialect": self.dialect.value,
        }

    @classmethod
    def from_fields(cls, fields: Fields) -> OpEnvelope:
        return cls(
            request_id=fields[b"request_id"].decode(),
            model_id=fields[b"model_id"].decode(),
            seq_id=int(fields[b"seq_id"]),
            kind=OpKind(fields[b"kind"].decode()),
            body=fields[b"body"],
            dialect=Dialect(fields.get(b"dialect", b"tinker").decode()),
        )


def default_snapshot_prefix(run_id: str) -> str:
    return f"snapshots/{run_id}"


@dataclass(frozen=True, slots=True)
class AttachEvent:
    """Put ``run_id`` on the deployment's worker (its ops stream is read from the start, after
    the run's snapshot under ``snapshot_prefix`` in the object store, if any, is restored)."""

    run_id: str
    max_seq_len: int
    snapshot_prefix: str = ""  # "" = default_snapshot_prefix(run_id)

    @property
    def snapshots(self) -> str:
        return self.snapshot_prefix or default_snapshot_prefix(self.run_id)

    def to_fields(self) -> OutFields:
        return {"run_id": self.run_id, "max_seq_len": str(self.max_seq_len), "snapshot_prefix": self.snapshots}

    @classmethod
    def from_fields(cls, fields: Fields) -> AttachEvent:
        return cls(
            run_id=fields[b"run_id"].decode(),
            max_seq_len=int(fields[b"max_seq_len"]),
            snapshot_prefix=fields.get(b"snapshot_prefix", b"").decode(),
        )


@dataclass(frozen=True, slots=True)
class FutureResult:
    """The stored outcome of one future (the hash at :func:`future_key`)."""

    state: FutureState
    content_type: str = JSON_CONTENT
    body: bytes = b""
    category: ErrorCategory | None = None

    def to_fields(self) -> OutFields:
        out: OutFields = {
            "state": self.state.value,
            "content_type": self.content_type,
            "body": self.body,
        }
        if self.category is not None:
            out["category"] = self.category.value
        return out

    @classmethod
    def from_fields(cls, fields: Fields) -> FutureResult:
        cat = fields.get(b"category")
        return cls(
            state=FutureState(fields[b"state"].decode()),
            content_type=fields.get(b"content_type", JSON_CONTENT.encode()).decode(),
            body=fields.get(b"body", b""),
            category=ErrorCategory(cat.decode()) if cat else None,
        )

    @classmethod
    def ok_json(cls, payload: dict[str, Any]) -> FutureResult:
        return cls(FutureState.DONE, JSON_CONTENT, json.dumps(payload).encode())

    @classmethod
    def ok_proto(cls, body: bytes) -> FutureResult:
        return cls(FutureState.DONE, PROTOBUF_CONTENT, body)

    @classmethod
    def failed(cls, message: str, category: ErrorCategory) -> FutureResult:
        return cls(
            FutureState.FAILED,
            JSON_CONTENT,
            json.dumps({"error": message, "category": category.value}).encode(),
            category,
        )


# A future's answer rides in its FUTURE_DONE_CHANNEL message when its body is at most this
# large, so a waiting poll answers without reading the hash back; a larger one (a 32 × 256
# forward's logprobs) is announced by its request id alone and read from the hash. Every API
# replica receives every message: the cap bounds that fan-out.
INLINE_RESULT_MAX_BYTES = 64 * 1024


def done_message(request_id: str, result: FutureResult) -> bytes:
    """What is PUBLISHed on :data:`FUTURE_DONE_CHANNEL` once ``result`` is in the future's hash:
    the request id, and the result too when it is small (see :func:`parse_done_message`)."""
    if len(result.body) > INLINE_RESULT_MAX_BYTES:
        return request_id.encode()
    category = result.category.value if result.category is not None else ""
    head = "\n".join((request_id, result.state.value, category, result.content_type))
    return head.encode() + b"\n" + result.body


def parse_done_message(data: bytes | str) -> tuple[str, FutureResult | None]:
    """``(request_id, result or None)`` of a :data:`FUTURE_DONE_CHANNEL` message: a bare request
    id (a large result, or a publisher that does not inline) carries no result. Request ids never
    hold a newline."""
    raw = data.encode() if isinstance(data, str) else data
    if b"\n" not in raw:
        return raw.decode(), None
    rid, state, category, content_type, body = raw.split(b"\n", 4)
    result = FutureResult(
        state=FutureState(state.decode()),
        content_type=content_type.decode(),
        body=body,
        category=ErrorCategory(category.decode()) if category else None,
    )
    return rid.decode(), result


@dataclass(frozen=True, slots=True)
class CheckpointFile:
    relative_path: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Completion:
    """A checkpoint-producing op finished in the worker; the control plane finalizes it.

    ``result`` is the JSON result to hand to the client once the checkpoint row exists; on
    failure ``error``/``category`` are set instead and no checkpoint fields are meaningful.
    """

    request_id: str
    run_id: str
    kind: OpKind
    result: dict[str, Any] = field(default_factory=dict)
    # checkpoint facts (for save_weights / save_weights_for_sampler)
    checkpoint_kind: str | None = None  # "weights" | "sampler_weights"
    checkpoint_name: str | None = None
    storage_prefix: str | None = None  # object-store key prefix holding the files
    files: list[CheckpointFile] = field(default_factory=list)
    lora_config: dict[str, Any] | None = None
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None
    # the trainer's optimizer step when the checkpoint was written; with ``publish`` the
    # checkpoint becomes the adapter the run's paired sampler serves, at that version
    policy_version: int | None = None
    publish: bool = False
    error: str | None = None
    category: ErrorCategory | None = None

    def to_fields(self) -> OutFields:
        d = asdict(self)
        return {"payload": json.dumps(d)}

    @classmethod
    def from_fields(cls, fields: Fields) -> Completion:
        d = json.loads(fields[b"payload"])
        d["kind"] = OpKind(d["kind"])
        d["files"] = [CheckpointFile(**f) for f in d.get("files") or []]
        if d.get("category"):
            d["category"] = ErrorCategory(d["category"])
        return cls(**d)
