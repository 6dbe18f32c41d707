"""The request class of the app: JSON bodies nested too deeply for the decoder are a 400."""

from __future__ import annotations

from typing import Any

from litestar import Request

from control_plane.errors import InvalidInput


class ApiRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            # msgspec gives up at the interpreter's recursion limit (about 1000 levels)
            raise InvalidInput("the JSON body is nested too deeply", field="body") from None
