"""Schemathesis hooks for the conformance run (tests/control_plane/test_openapi_conformance.py).

1. ``POST /api/v1/forward_backward`` (and ``/forward``) take a ``ForwardBackwardRequest``
   protobuf, which schemathesis cannot generate from a JSON schema: generated as real messages
   (any model id, seq id, loss and datums) or as raw bytes. ``POST /v1/loops/checkpoints/import``
   takes a tar archive: a real adapter's, or raw bytes.
2. Random ids name nothing, so by themselves generated requests only ever reach "not found".
   The test seeds real resources (a session, a run with its sampler and deployment,
   checkpoints, an operation, a future, a download token) and passes their ids in
   ``OPENLOOPS_CONFORMANCE_IDS``; half of the schema-valid cases the fuzzer draws get those ids
   in place of the generated ones, so success answers are checked against their schemas too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

from data_plane.wire import tinker_wire_pb2 as pb

IDS: dict[str, str] = json.loads(os.environ.get("OPENLOOPS_CONFORMANCE_IDS") or "{}")


def _request(model_id: str, seq_id: int, loss_fn: str, tokens: list[list[int]]) -> bytes:
    req = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn)
    for toks in tokens:
        datum = req.data.add()
        datum.model_input.add().encoded_text.tokens = b"".join(t.to_bytes(4, "little") for t in toks)
    return bytes(req.SerializeToString())


FORWARD_BACKWARD = st.builds(
    _request,
    st.sampled_from([IDS.get("model_id", "m"), "", "nope:train:0"]) | st.text(max_size=40),
    st.integers(min_value=-1, max_value=2**31 - 1),
    st.sampled_from(["", "cross_entropy", "importance_sampling", "nope"]),
    st.lists(st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=4), max_size=3),
)

schemathesis.openapi.media_type("application/x-protobuf", FORWARD_BACKWARD | st.binary(max_size=64))


def _adapter_archive() -> bytes:
    import tempfile
    from pathlib import Path

    from tests.control_plane.adapters import make_adapter, tar_of

    with tempfile.TemporaryDirectory() as tmp:
        return tar_of(make_adapter(Path(tmp) / "adapter", rank=2))


ADAPTER_TAR = _adapter_archive()
for _media in ("application/x-tar", "application/gzip"):
    schemathesis.openapi.media_type(_media, st.just(ADAPTER_TAR) | st.binary(max_size=64))


def _path_value(path: str, method: str, name: str) -> str | None:
    if name == "checkpoint_id" and path.startswith("/api/v1/training_runs"):
        action = {"PUT": "/ttl", "POST": "/publish", "GET": "/external_weights_urls"}.get(method.upper(), "")
        return IDS["tinker_checkpoint_id"] + action
    if path.startswith("/v1/models/") and name in ("model_id", "deployment_id"):
        return IDS["sampler_id"]  # a dedicated sampler's model and deployment are the sampler
    return {
        "session_id": IDS.get("session_id"),
        "run_id": IDS.get("run_id"),
        "trainer_id": IDS.get("run_id"),
        "sampler_id": IDS.get("sampler_id"),
        "deployment_id": IDS.get("deployment_id"),
        "checkpoint_id": IDS.get("checkpoint_id"),
        "operation_id": IDS.get("operation_id"),
        "token": IDS.get("token"),
    }.get(name)


_BODY = {
    "session_id": "session_id",
    "base_model": "base_model",
    "model": "base_model",
    "model_id": "model_id",
    "trainer_id": "run_id",
    "run_id": "run_id",
    "request_id": "request_id",
    "sampling_session_id": "sampling_session_id",
    "tinker_path": "weights_path",
    "path": "weights_path",
    "checkpoint_path": "sampler_path",
    "model_path": "sampler_path",
}
_QUERY = {"run_id": "run_id", "base_model": "base_model"}
_HEADERS = {"X-Run-Id": "run_id"}


def _real(case: Any) -> Any:
    op = case.operation
    if case.path_parameters:
        case.path_parameters = {k: _path_value(op.path, op.method, k) or v for k, v in case.path_parameters.items()}
    if isinstance(case.query, dict) and case.query:
        case.query = {k: IDS[_QUERY[k]] if k in _QUERY else v for k, v in case.query.items()}
    if case.headers:
        case.headers = {k: IDS[_HEADERS[k]] if k in _HEADERS else v for k, v in case.headers.items()}
    if isinstance(case.body, dict):
        # a save's ``path`` is the new checkpoint's name, not a path to an existing one
        keep = {"path"} if op.path.endswith(("/save_weights", "/save_weights_for_sampler")) else set()
        case.body = {
            k: IDS[_BODY[k]] if k in _BODY and k not in keep and isinstance(v, str) else v for k, v in case.body.items()
        }
    return case


@schemathesis.hook
def flatmap_case(context: schemathesis.HookContext, case: Any) -> st.SearchStrategy[Any]:
    meta = case.meta
    if not IDS or meta is None or not meta.generation.mode.is_positive:
        return st.just(case)
    return st.booleans().map(lambda real: _real(case) if real else case)
