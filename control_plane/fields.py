"""The limits of request inputs, declared once in their types.

Every string, id and integer a request carries is typed here with its limits: the longest value
its database column holds (read from the SQLAlchemy models), no NUL character (PostgreSQL text
cannot hold one), and the range of its integer column. msgspec enforces them where a body is
decoded (the API's edge, before a handler runs, answering a violation with a 400 naming the
field); the OpenAPI shows them (``maxLength``, ``pattern``, ``minimum``, ``maximum``). Services
never see an input that breaks them.

These are the ``msgspec.Meta`` aliases of body fields; a leaf, so that the wire types below the
API (``control_plane.training.loops_wire``) use the same ones. Path, query and header
parameters use the ``Parameter`` factories of :mod:`control_plane.api.fields`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
from sqlalchemy.orm import InstrumentedAttribute

from control_plane.db import models as m
from control_plane.errors import InvalidInput
from data_plane.wire.paths import NAME_RE

NO_NUL = r"^[^\x00]*$"
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# the largest int64 that a JSON-Schema bound, written as a double, states exactly
INT64_MAX = 2**63 - 1024
INT64_MIN = -(2**63)
# free-form JSON (metadata, optimizer settings): how deep it may nest
MAX_JSON_DEPTH = 32


def column_length(attr: InstrumentedAttribute[Any]) -> int:
    """The declared length of a ``String(n)`` column."""
    length = getattr(attr.property.columns[0].type, "length", None)
    if not isinstance(length, int):
        raise TypeError(f"{attr} has no declared length")
    return length


def _meta(max_length: int | None = None, *, min_length: int | None = None, pattern: str = NO_NUL) -> msgspec.Meta:
    return msgspec.Meta(max_length=max_length, min_length=min_length, pattern=pattern)


def column_text(attr: InstrumentedAttribute[Any], *, min_length: int | None = None) -> msgspec.Meta:
    return _meta(column_length(attr), min_length=min_length)


# --- body fields (msgspec) ----------------------------------------------------------------
Text = Annotated[str, _meta()]  # a Text column, or a value that only passes through
SessionId = Annotated[str, column_text(m.Session.id)]
RunId = Annotated[str, column_text(m.Run.id)]
SamplerId = Annotated[str, column_text(m.Sampler.id)]
ProjectId = Annotated[str, column_text(m.TrainingProject.id)]
ModelName = Annotated[str, column_text(m.Run.base_model)]
RunName = Annotated[str, column_text(m.Run.name)]
DisplayName = Annotated[str, column_text(m.Session.display_name)]
SdkVersion = Annotated[str, column_text(m.Session.sdk_version)]
AvailabilityModel = Annotated[str, column_text(m.Run.availability_model)]
FinishReasonType = Annotated[str, column_text(m.Session.finish_reason)]
# a checkpoint name as data_plane/wire/paths.py accepts it (its column holds as many)
CheckpointName = Annotated[str, msgspec.Meta(max_length=column_length(m.Checkpoint.name), pattern=NAME_RE.pattern)]

# tinker://{run_id}/{kind}/{name} or bt://loops:{run_id}/{kind}/{name} (data_plane/wire/paths.py)
_NAME = NAME_RE.pattern.removeprefix("^").removesuffix("$")
CHECKPOINT_PATH = rf"^(?:tinker://|bt://loops:)[^/\x00]+/(?:weights|sampler_weights)/{_NAME}$"
LOOPS_SAMPLER_CHECKPOINT_PATH = rf"^bt://loops:[^/\x00]+/sampler_weights/{_NAME}$"
CheckpointPath = Annotated[str, msgspec.Meta(pattern=CHECKPOINT_PATH)]
# where the empty string means "none given"
CheckpointPathOrEmpty = Annotated[str, msgspec.Meta(pattern=f"^$|{CHECKPOINT_PATH}")]

Int32 = Annotated[int, msgspec.Meta(ge=INT32_MIN, le=INT32_MAX)]
NonNegInt32 = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
PosInt32 = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
NonNegInt64 = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


# --- free-form JSON ---------------------------------------------------------------------------
def check_json(value: Any, field: str, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Reject free-form JSON that PostgreSQL (or the next reader) cannot take: a NUL in any key
    or string, or nesting deeper than ``max_depth``. Iterative: no input can exhaust the stack."""
    for depth, item in _walk(value):
        if depth > max_depth:
            raise InvalidInput(f"{field} nests deeper than {max_depth} levels", field=field)
        if isinstance(item, str) and "\x00" in item:
            raise InvalidInput(f"{field} holds a NUL character", field=field)


def _walk(value: Any) -> Iterator[tuple[int, Any]]:
    stack: list[tuple[int, Any]] = [(0, value)]
    while stack:
        depth, item = stack.pop()
        yield depth, item
        if isinstance(item, dict):
            for k, v in item.items():
                stack.append((depth + 1, k))
                stack.append((depth + 1, v))
        elif isinstance(item, list):
            stack.extend((depth + 1, v) for v in item)
