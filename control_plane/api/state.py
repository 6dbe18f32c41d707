"""What a route handler reaches through the application: the process's :class:`Runtime`."""

from __future__ import annotations

from typing import cast

from litestar import Request

from control_plane.runtime import Runtime


def rt(request: Request) -> Runtime:
    """The runtime the app was built with (``create_app`` puts it in ``app.state``)."""
    return cast("Runtime", request.app.state.runtime)
