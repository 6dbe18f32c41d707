"""``POST /api/v1/retrieve_future``: long-polls a future (wire protocol section 4)."""

from __future__ import annotations

import json

from litestar import Controller, Request, Response, post
from litestar.di import Provide

from control_plane.api.auth import provide_principal
from control_plane.api.state import rt
from control_plane.api.tinker.bootstrap import OWN
from control_plane.api.tinker.schemas import RetrieveFutureBody
from control_plane.auth.principal import Principal
from control_plane.errors import Gone, InvalidInput
from data_plane.wire import queue as q


class TinkerFuturesController(Controller):
    path = "/api/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["tinker"]

    @post("/retrieve_future", opt=OWN, status_code=200)
    async def retrieve_future(
        self, request: Request, principal: Principal, data: RetrieveFutureBody
    ) -> Response[bytes]:
        if not data.request_id:
            raise InvalidInput("request_id is required", field="request_id")
        r = rt(request)
        waiter = r.futures
        cur = await waiter.wait(data.request_id, r.settings.future_poll_timeout_seconds, org_id=principal.org_id)
        if cur is None:
            raise Gone(f"future {data.request_id!r} is unknown or expired")
        if cur.state == q.FutureState.PENDING:
            body = {"type": "try_again", "request_id": data.request_id, "queue_state": "active"}
            return Response(content=json.dumps(body).encode(), media_type=q.JSON_CONTENT)
        # done or failed: the stored body is exactly what the SDK expects (JSON result,
        # protobuf result, or {"error", "category"}); it stays readable until it expires
        return Response(content=cur.body, media_type=cur.content_type)
