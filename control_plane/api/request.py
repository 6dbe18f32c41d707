"""The request class of the app: JSON bodies nested too deeply for the decoder are a 400, and
routes whose bodies are naturally small take a smaller body limit.

A route opts into the smaller limit with ``opt={..., "body_limit": "control"}``
(:data:`CONTROL_BODY`): its body may be at most ``control_body_limit_bytes`` (1 MiB by
default), refused with 413 naming the limit. Other routes take ``request_body_limit_bytes``
(the app's limit, enforced by Litestar)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from litestar import Request

from control_plane.errors import InvalidInput, PayloadTooLarge

# the ``opt`` entry of a route that creates or changes a resource (sessions, runs, samplers,
# served models, keys, capacity): its body is JSON of a few fields
CONTROL_BODY = {"body_limit": "control"}


class ApiRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            # msgspec gives up at the interpreter's recursion limit (about 1000 levels)
            raise InvalidInput("the JSON body is nested too deeply", field="body") from None

    def _route_body_limit(self) -> int | None:
        if self.route_handler.opt.get("body_limit") != "control":
            return None
        return int(self.app.state.runtime.settings.control_body_limit_bytes)

    async def stream(self) -> AsyncGenerator[bytes, None]:
        limit = self._route_body_limit()
        if limit is None:
            async for chunk in super().stream():
                yield chunk
            return
        refusal = (
            f"the body of {self.method} {self.url.path} may be at most {limit} bytes "
            "(OPENLOOPS_CONTROL_BODY_LIMIT_BYTES)"
        )
        announced = self.content_length
        if announced is not None and announced > limit:
            raise PayloadTooLarge(refusal)
        total = 0
        async for chunk in super().stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(refusal)
            yield chunk
