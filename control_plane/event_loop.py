"""The event loop an openloops API process runs on (``Settings.event_loop``).

asyncio's own loop by default. uvloop (optional, Linux and macOS) spends less CPU per Postgres
and Redis round trip, but under the API benchmark's 64 concurrent keep-alive connections it left
some sockets unread for 100-500 ms while the loop itself never lagged more than ~35 ms (seen in
the kernel: requests waiting in the server sockets' receive queues; no such waits with asyncio),
which put p99 at 20-200 ms instead of 16 ms. Choose it with ``OPENLOOPS_EVENT_LOOP=uvloop`` where
throughput of uncached reads matters more than the tail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopKind = Literal["asyncio", "uvloop"]


class EventLoopUnavailable(RuntimeError):
    pass


def loop_factory(kind: LoopKind) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:  # Windows, or a trimmed install
        raise EventLoopUnavailable(
            "OPENLOOPS_EVENT_LOOP=uvloop but uvloop is not installed (pip install uvloop), or use 'asyncio'"
        ) from exc
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T], kind: LoopKind) -> T:
    """``asyncio.run`` on the chosen event loop."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(coro)


def http_implementation() -> str:
    """uvicorn's ``http=``: httptools (C parser) when installed, h11 otherwise."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover
        return "h11"
    return "httptools"
