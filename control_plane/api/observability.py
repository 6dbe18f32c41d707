"""Request ids, structured access logs and Prometheus metrics (an ASGI middleware)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "openloops_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "openloops_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        # labelled children by label values: labels() takes a lock and validates every call
        self._counts: dict[tuple[str, str, str], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.requests.labels(*key)
        latency = self._latencies.get(key[:2])
        if latency is None:
            latency = self._latencies[key[:2]] = self.latency.labels(method, route)
        count.inc()
        latency.observe(seconds)


def observability_middleware(metrics: HttpMetrics, access_log: bool) -> Callable[[Any], Any]:
    # bound once with the logging configuration of the moment (the app is built after it):
    # a lazy module-level logger would bind itself again on every request
    log = structlog.get_logger("openloops.access").bind()

    def factory(app: Any) -> Any:
        async def middleware(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            rid = None
            for k, v in scope.get("headers", []):
                if k == b"x-request-id":
                    rid = v.decode("latin-1")[:128]
                    break
            # not a secret, only unique: 128 random bits without a getrandom() system call
            rid = rid or f"{random.getrandbits(128):032x}"
            scope.setdefault("state", {})["request_id"] = rid
            status = 500
            start = time.perf_counter()

            async def send_wrapper(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
                await send(message)

            try:
                await app(scope, receive, send_wrapper)
            finally:
                elapsed = time.perf_counter() - start
                route = scope.get("path_template") or "unmatched"
                metrics.observe(scope["method"], route, status, elapsed)
                if access_log:
                    log.info(
                        "request",
                        request_id=rid,
                        method=scope["method"],
                        path=scope["path"],
                        route=route,
                        status=status,
                        duration_ms=round(elapsed * 1000, 2),
                        principal=scope["state"].get("principal_id"),
                    )

        return middleware

    return factory
