"""The one table mapping errors to HTTP responses. Every 4xx/5xx body is an
:class:`ErrorBody`: ``{"code", "detail", "request_id", "field"?, "errors"?, ...}``
(control_plane/api/openapi.py declares it for every route)."""

from __future__ import annotations

import re
import uuid

import msgspec
import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from control_plane import errors as e
from control_plane.sampling.errors import SamplingError

log = structlog.get_logger("openloops.api")


class ErrorItem(msgspec.Struct, omit_defaults=True):
    """One failed check of a request's parameters or body."""

    message: str
    field: str | None = None
    source: str | None = None  # body | query | path | header


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The body of every error answer."""

    code: str  # machine-readable: invalid_input, not_found, rate_limited, ...
    detail: str  # for people
    request_id: str  # the answer's x-request-id
    field: str | None = None  # the input at fault, when one is
    errors: list[ErrorItem] | None = None  # each failed check, when request validation failed
    category: str | None = None  # sampling errors: user | server
    retry_after_s: float | None = None  # 429: when to retry (also in Retry-After)
    # stable machine-readable context, as Loops' ApiError: {"reason": "loops_capacity"} for a
    # capacity refusal (the Loops SDK reads details.reason), the guard rail's name for a limit
    details: dict[str, str] | None = None


STATUS_BY_ERROR: dict[type[e.DomainError], int] = {
    e.InvalidInput: 400,
    e.Unauthenticated: 401,
    e.Forbidden: 403,
    e.NotFound: 404,
    e.Conflict: 409,
    e.Gone: 410,
    e.PayloadTooLarge: 413,
    e.CapacityExceeded: 429,  # details.reason = "loops_capacity", Retry-After
    e.LimitExceeded: 429,  # details.reason names the guard rail
    e.RateLimited: 429,
    e.Unavailable: 503,
}


def http_status_of(exc: BaseException) -> int:
    """The status this table answers ``exc`` with (for request metrics)."""
    if isinstance(exc, e.DomainError):
        return next((st for cls, st in STATUS_BY_ERROR.items() if isinstance(exc, cls)), 500)
    if isinstance(exc, SamplingError):
        return exc.status_code
    if isinstance(exc, ValidationException):
        return 400
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def _request_id(request: Request) -> str:
    # unmatched routes never reach the observability middleware: give them an id here
    state = request.scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
    return str(state["request_id"])


def error_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    *,
    field: str | None = None,
    errors: list[ErrorItem] | None = None,
    category: str | None = None,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
    details: dict[str, str] | None = None,
) -> Response[ErrorBody]:
    body = ErrorBody(
        code=code,
        detail=detail,
        request_id=_request_id(request),
        field=field,
        errors=errors,
        category=category,
        retry_after_s=retry_after_s,
        details=details,
    )
    headers = dict(headers or {})
    if status == 429 and retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(retry_after_s + 0.999)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="openloops"'
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def domain_error_handler(request: Request, exc: e.DomainError) -> Response[ErrorBody]:
    status = next((st for cls, st in STATUS_BY_ERROR.items() if isinstance(exc, cls)), 500)
    retry = round(exc.retry_after_s, 3) if isinstance(exc, e.RateLimited) else None
    reason = exc.reason if isinstance(exc, e.RateLimited) else None
    return error_response(
        request,
        status,
        exc.code,
        exc.message,
        field=exc.field,
        retry_after_s=retry,
        details={"reason": reason} if reason else None,
    )


def sampling_code(cls: type[SamplingError]) -> str:
    """The ``code`` of a sampling error: its class name in snake case."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def sampling_error_handler(request: Request, exc: SamplingError) -> Response[ErrorBody]:
    """Errors of the sampling path carry their own status (400/404/429/500/503)."""
    retry = 1.0 if exc.status_code == 429 else None
    return error_response(
        request, exc.status_code, sampling_code(type(exc)), exc.message, category=exc.category, retry_after_s=retry
    )


_MISSING = re.compile(r"missing required field `([^`]+)`")
_AT = re.compile(r"at `\$\.([^`]+)`")
_MISSING_PARAM = re.compile(r"Missing required \w+ parameter '([^']+)'")


def _field_of(request: Request, key: object, message: str) -> str | None:
    """The wire name of the input at fault. Litestar reports body errors under key "data"
    (msgspec names the real field in the text) and parameters under their Python name."""
    if key in (None, "data"):
        m = _MISSING.search(message) or _AT.search(message)
        return m.group(1) if m else ("body" if key == "data" else None)
    name = str(key)
    param = request.route_handler.parsed_fn_signature.parameters.get(name)
    kwarg = getattr(param, "kwarg_definition", None)
    alias = getattr(kwarg, "query", None) or getattr(kwarg, "header", None) or getattr(kwarg, "cookie", None)
    return str(alias) if alias else name


def missing_parameter(exc: ValidationException) -> str | None:
    """The parameter a request lacks, when that is what failed."""
    m = _MISSING_PARAM.search(str(exc.detail))
    return m.group(1) if m else None


def validation_handler(request: Request, exc: ValidationException) -> Response[ErrorBody]:
    errors: list[ErrorItem] = []
    for item in exc.extra or []:
        if isinstance(item, dict):
            msg = str(item.get("message"))
            source = item.get("source")
            errors.append(
                ErrorItem(
                    message=msg,
                    field=_field_of(request, item.get("key"), msg),
                    source=str(source) if source is not None else None,
                )
            )
    fields = [x.field for x in errors if x.field]
    if not fields and (missing := missing_parameter(exc)):
        fields = [missing]
    detail = "; ".join(f"{x.field}: {x.message}" if x.field else x.message for x in errors)
    return error_response(
        request,
        400,
        "invalid_input",
        detail or str(exc.detail),
        field=fields[0] if fields else None,
        errors=errors or None,
    )


def http_exception_handler(request: Request, exc: HTTPException) -> Response[ErrorBody]:
    code = {400: "invalid_input", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code, "http_error"
    )
    detail = exc.detail
    headers: dict[str, str] = {}
    field = None
    if exc.status_code == 400 and "JSON is malformed" in str(detail):  # the body did not decode
        field = "body"
    if isinstance(exc, NotFoundException):
        detail = f"no route for {request.method} {request.url.path}"
    elif isinstance(exc, MethodNotAllowedException):
        detail = f"method {request.method} not allowed on {request.url.path}"
        allow = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        if allow:  # RFC 9110: a 405 names the methods the resource has
            headers["Allow"] = allow
    return error_response(request, exc.status_code, code, str(detail), field=field, headers=headers)


def internal_error_handler(request: Request, exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error", path=request.url.path, error=repr(exc))
    return error_response(request, HTTP_500_INTERNAL_SERVER_ERROR, "internal_error", "internal server error")


EXCEPTION_HANDLERS = {
    e.DomainError: domain_error_handler,
    SamplingError: sampling_error_handler,
    ValidationException: validation_handler,
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}
