"""The one table mapping errors to HTTP responses. Every 4xx/5xx body is JSON:
``{"code": str, "detail": str, "field"?: str, "errors"?: [...], "request_id": str}``."""

from __future__ import annotations

import re
import uuid

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

STATUS_BY_ERROR: dict[type[e.DomainError], int] = {
    e.InvalidInput: 400,
    e.Unauthenticated: 401,
    e.Forbidden: 403,
    e.NotFound: 404,
    e.Conflict: 409,
    e.Gone: 410,
    e.PayloadTooLarge: 413,
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


def error_response(request: Request, status: int, code: str, detail: str, **extra: object) -> Response:
    body: dict[str, object] = {"code": code, "detail": detail, "request_id": _request_id(request)}
    body.update({k: v for k, v in extra.items() if v is not None})
    headers = {}
    if status == 429 and "retry_after_s" in extra:
        headers["Retry-After"] = str(max(1, int(float(extra["retry_after_s"]) + 0.999)))  # type: ignore[arg-type]
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="openloops"'
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def domain_error_handler(request: Request, exc: e.DomainError) -> Response:
    status = next((st for cls, st in STATUS_BY_ERROR.items() if isinstance(exc, cls)), 500)
    extra: dict[str, object] = {"field": exc.field}
    if isinstance(exc, e.RateLimited):
        extra["retry_after_s"] = round(exc.retry_after_s, 3)
    return error_response(request, status, exc.code, exc.message, **extra)


def sampling_error_handler(request: Request, exc: SamplingError) -> Response:
    """Errors of the sampling path carry their own status (400/404/429/500/503)."""
    code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    extra: dict[str, object] = {"category": exc.category}
    if exc.status_code == 429:
        extra["retry_after_s"] = 1.0
    return error_response(request, exc.status_code, code, exc.message, **extra)


_MISSING = re.compile(r"missing required field `([^`]+)`")
_AT = re.compile(r"at `\$\.([^`]+)`")


def _field_of(key: object, message: str) -> object:
    """Litestar reports body errors under key "data"; msgspec names the real field in the text."""
    if key not in (None, "data"):
        return key
    m = _MISSING.search(message) or _AT.search(message)
    return m.group(1) if m else key


def validation_handler(request: Request, exc: ValidationException) -> Response:
    errors = []
    for item in exc.extra or []:
        if isinstance(item, dict):
            msg = str(item.get("message"))
            errors.append({"field": _field_of(item.get("key"), msg), "message": msg, "source": item.get("source")})
    fields = [x["field"] for x in errors if x.get("field")]
    detail = "; ".join(f"{x['field']}: {x['message']}" if x.get("field") else str(x["message"]) for x in errors)
    return error_response(
        request,
        400,
        "invalid_input",
        detail or str(exc.detail),
        field=fields[0] if fields else None,
        errors=errors or None,
    )


def http_exception_handler(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
    detail = exc.detail
    if isinstance(exc, NotFoundException):
        detail = f"no route for {request.method} {request.url.path}"
    elif isinstance(exc, MethodNotAllowedException):
        detail = f"method {request.method} not allowed on {request.url.path}"
    return error_response(request, exc.status_code, code, str(detail))


def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", path=request.url.path, error=repr(exc))
    return error_response(request, HTTP_500_INTERNAL_SERVER_ERROR, "internal_error", "internal server error")


EXCEPTION_HANDLERS = {
    e.DomainError: domain_error_handler,
    SamplingError: sampling_error_handler,
    ValidationException: validation_handler,
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}
