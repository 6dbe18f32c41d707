"""What a route declares in the OpenAPI besides its success body: the errors it can answer.

Every 4xx/5xx body is one shape, :class:`ErrorBody`, made by the one error table in
:mod:`control_plane.api.errors`. A route lists the errors it can raise, as the domain error
classes (or sampling errors, or ``(status, code)`` for an answer outside the table), and
:func:`raises` turns them into Litestar ``responses``: one entry per status, each with
``ErrorBody`` and a description naming the error codes. An authenticated route gets 401, 403
and 429 without listing them; a route that takes any input lists :class:`InvalidInput`
(400: its parameters and body are validated before it runs), and one that reads a body
:class:`PayloadTooLarge` (413)::

    @post("/runs/{run_id:str}/deactivate", opt=ORG, responses=raises(InvalidInput, NotFound))

A route whose answer Litestar cannot infer from its return annotation (an already-encoded body,
a pass-through) states it with ``ok=``; the body is still encoded as the handler encodes it.
``tests/control_plane/test_openapi_declarations.py`` checks every route against these rules and
``tests/control_plane/test_openapi_conformance.py`` checks the served schema against the server.

Also here: :class:`OptionalBodyOperation` (``operation_class=`` of a route whose body may be
left out: Litestar marks every body required) and :class:`ExactJsonRenderPlugin` (the served
``openapi.json``, integer bounds written as integers). Input limits: :mod:`control_plane.fields` (bodies) and :mod:`control_plane.api.fields` (parameters).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from litestar import Request
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Operation, RequestBody

from control_plane import errors as e
from control_plane.api.errors import STATUS_BY_ERROR, ErrorBody, sampling_code
from control_plane.sampling.errors import SamplingError

# an error class of the table, a sampling error, or a protocol answer as (status, code)
ErrorKind = type[e.DomainError] | type[SamplingError] | tuple[int, str]


# every route behind an API key: no key or a bad one, a key without the route's scope, a key
# over its rate limit
AUTHENTICATED: tuple[ErrorKind, ...] = (e.Unauthenticated, e.Forbidden, e.RateLimited)


def status_of(kind: ErrorKind) -> int:
    if isinstance(kind, tuple):
        return kind[0]
    if issubclass(kind, SamplingError):
        return kind.status_code
    return next(st for cls, st in STATUS_BY_ERROR.items() if issubclass(kind, cls))


def code_of(kind: ErrorKind) -> str:
    if isinstance(kind, tuple):
        return kind[1]
    if issubclass(kind, SamplingError):
        return sampling_code(kind)
    return kind.code


def raises(
    *errors: ErrorKind,
    public: bool = False,
    ok: Any = None,
    ok_status: int = 200,
    ok_description: str | None = None,
    ok_media_type: str = "application/json",
) -> dict[int, ResponseSpec]:
    """The ``responses`` of a route: its errors (plus the authenticated ones unless ``public``)
    with :class:`ErrorBody`, and, when given, its success body ``ok``."""
    kinds: list[ErrorKind] = [*errors, *(() if public else AUTHENTICATED)]
    codes: dict[int, list[str]] = {}
    for kind in kinds:
        status = status_of(kind)
        if not 400 <= status < 600:
            raise ValueError(f"{kind!r} is not an error status")
        code = code_of(kind)
        if code not in codes.setdefault(status, []):
            codes[status].append(code)
    out = {status: _error_spec(status, codes[status]) for status in sorted(codes)}
    if ok is not None:
        out[ok_status] = ResponseSpec(
            data_container=ok,
            description=ok_description or HTTPStatus(ok_status).phrase,
            media_type=ok_media_type,
            generate_examples=False,
        )
    return out


def _error_spec(status: int, codes: Iterable[str]) -> ResponseSpec:
    listed = ", ".join(f"`{c}`" for c in codes)
    return ResponseSpec(
        data_container=ErrorBody,
        description=f"{HTTPStatus(status).phrase} (code {listed})",
        generate_examples=False,
    )


@dataclass
class OptionalBodyOperation(Operation):
    """The operation of a route whose body may be left out (Litestar marks every body required)."""

    def __post_init__(self) -> None:
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _exact_bounds(node: Any) -> Any:
    """Litestar writes every bound as a float; an integer's bound goes out as the integer
    (a float such as 9.223372036854775e+18 reads back as a different number)."""
    if isinstance(node, dict):
        is_int = node.get("type") == "integer"
        return {
            k: int(v) if is_int and k in _BOUNDS and isinstance(v, float) and v.is_integer() else _exact_bounds(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_exact_bounds(v) for v in node]
    return node


class ExactJsonRenderPlugin(JsonRenderPlugin):
    """``openapi.json`` with integer bounds written as integers (rendered once)."""

    def __init__(self) -> None:
        super().__init__()
        self._rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = self.render_json(request, _exact_bounds(openapi_schema))
        return self._rendered
