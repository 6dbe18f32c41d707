"""Litestar's side of the input limits of :mod:`control_plane.fields`: path, query and header
``Parameter`` factories (Litestar reads only ``Parameter`` there), and list-item schemas for the
OpenAPI.
"""

from __future__ import annotations

from typing import Any

from litestar.openapi.spec import Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import KwargDefinition, Parameter, ParameterKwarg
from sqlalchemy.orm import InstrumentedAttribute

from control_plane.fields import NO_NUL, column_length


def items(
    kind: OpenAPIType,
    *,
    pattern: str | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    min_items: int | None = None,
) -> KwargDefinition:
    """The schema of a list's items, for the OpenAPI: Litestar drops the msgspec limits of a
    list's items from the schema (msgspec still enforces them). Use it on a list without
    limits of its own (``Annotated[list[Text], items(OpenAPIType.STRING, pattern=NO_NUL)]``);
    ``min_items`` is stated only (the handler checks it)."""
    return KwargDefinition(
        min_items=min_items,
        schema_extra={"items": Schema(type=kind, pattern=pattern, minimum=minimum, maximum=maximum)},
    )


# --- parameters (Litestar) ----------------------------------------------------------------
def path_id(attr: InstrumentedAttribute[Any], description: str | None = None) -> ParameterKwarg:
    """A resource id in the path: at most its column's length, no NUL."""
    return Parameter(max_length=column_length(attr), pattern=NO_NUL, description=description)


def query_text(
    name: str | None = None, *, max_length: int | None = None, description: str | None = None
) -> ParameterKwarg:
    return Parameter(query=name, max_length=max_length, pattern=NO_NUL, description=description)


def query_int(name: str | None = None, *, ge: int, le: int, description: str | None = None) -> ParameterKwarg:
    return Parameter(query=name, ge=ge, le=le, description=description)
