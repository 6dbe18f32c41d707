"""``POST /api/v1/retrieve_future``: long-polls a future (wire protocol section 4).

The hot read of a training loop: a finished future's stored body goes out as it is (JSON or a
protobuf, as the op wrote it), never decoded and encoded again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from litestar import Controller, Request, Response, post
from litestar.di import Provide
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType

from control_plane.api.auth import provide_principal
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.api.tinker.bootstrap import OWN
from control_plane.api.tinker.schemas import RetrieveFutureBody
from control_plane.auth.principal import Principal
from control_plane.errors import Gone, InvalidInput, PayloadTooLarge
from data_plane.wire import queue as q

_STRING = Schema(type=OpenAPIType.STRING)
# the JSON answers: still pending, failed, or the op's own JSON result (any object)
_TRY_AGAIN = Schema(
    type=OpenAPIType.OBJECT,
    title="TryAgain",
    required=["type", "request_id", "queue_state"],
    properties={
        "type": Schema(type=OpenAPIType.STRING, const="try_again"),
        "request_id": _STRING,
        "queue_state": _STRING,
    },
)
_FAILED = Schema(
    type=OpenAPIType.OBJECT,
    title="FutureFailed",
    required=["error", "category"],
    properties={"error": _STRING, "category": Schema(type=OpenAPIType.STRING, enum=["user", "server"])},
)
_RESULT = Schema(type=OpenAPIType.OBJECT, title="OpResult", description="the op's result, as the op's type defines it")


@dataclass
class FutureOperation(Operation):
    """``retrieve_future`` answers JSON or, for ops whose result is a protobuf message, that."""

    def __post_init__(self) -> None:
        assert self.responses is not None
        self.responses["200"] = OpenAPIResponse(
            description="the future's state or outcome",
            content={
                q.JSON_CONTENT: OpenAPIMediaType(schema=Schema(any_of=[_TRY_AGAIN, _FAILED, _RESULT])),
                q.PROTOBUF_CONTENT: OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
                ),
            },
        )


class TinkerFuturesController(Controller):
    path = "/api/v1"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["tinker"]

    @post(
        "/retrieve_future",
        opt=OWN,
        status_code=200,
        responses=raises(InvalidInput, PayloadTooLarge, Gone),
        operation_class=FutureOperation,
    )
    async def retrieve_future(self, request: Request, principal: Principal, data: RetrieveFutureBody) -> Response[Any]:
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
