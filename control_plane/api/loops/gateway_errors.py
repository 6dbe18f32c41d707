"""Error answers of the Loops data plane (a run's and a sampler's ``base_url``).

The Loops SDK retries a 400, 404 or 408 as "the server is still starting" unless the
gateway marks the refusal as its own: with ``X-Baseten-Accept-Error: 1`` (the SDK always
sends it) a 4xx carries ``X-Baseten-Error-Source: 06`` and ``X-Baseten-Error-Code: <code>``,
and the SDK fails at once with our message instead of retrying for ten minutes.
"""

from __future__ import annotations

import json
from typing import Any

from litestar import Request, Response
from litestar.exceptions import ValidationException

from control_plane.api.errors import (
    EXCEPTION_HANDLERS,
    ErrorBody,
    domain_error_handler,
    missing_parameter,
    validation_handler,
)
from control_plane.errors import RunOrSamplerRequired

ACCEPT_ERROR = "x-baseten-accept-error"
ERROR_SOURCE = "X-Baseten-Error-Source"
ERROR_CODE = "X-Baseten-Error-Code"
GATEWAY_SOURCE = "06"


# statuses the SDK must keep retrying: "still working" (408) and "slow down" (429)
RETRYABLE = frozenset({408, 429})


def mark(request: Request, response: Response[Any]) -> Response[Any]:
    """Add the gateway's error headers to a 4xx refusal when the client asked for them."""
    status = response.status_code or 200
    if 400 <= status < 500 and status not in RETRYABLE and request.headers.get(ACCEPT_ERROR) == "1":
        code = "error"
        content = response.content
        if isinstance(content, ErrorBody):
            code = content.code
        elif isinstance(content, dict):
            code = str(content.get("code") or code)
        elif isinstance(content, bytes | str):
            try:
                code = str(json.loads(content).get("code") or code)
            except (ValueError, AttributeError):
                pass
        response.headers[ERROR_SOURCE] = GATEWAY_SOURCE
        response.headers[ERROR_CODE] = code
    return response


def _wrap(handler: Any) -> Any:
    def handle(request: Request, exc: Exception) -> Response[Any]:
        return mark(request, handler(request, exc))

    return handle


def _validation(request: Request, exc: ValidationException) -> Response[Any]:
    """A data-plane request without its routing header is refused as the protocol says."""
    if missing_parameter(exc) in ("X-Run-Id", "X-Sampler-Id"):
        return domain_error_handler(
            request,
            RunOrSamplerRequired("name the run (X-Run-Id) or the sampler this request is for", field="X-Run-Id"),
        )
    return validation_handler(request, exc)


# the one error table, with the gateway headers added: for the data-plane controllers
DATA_PLANE_EXCEPTION_HANDLERS = {
    exc: _wrap(h) for exc, h in {**EXCEPTION_HANDLERS, ValidationException: _validation}.items()
}
