"""ASGI middleware of the app: HTTP request metrics (``nextword_requests_total``,
``nextword_request_duration_seconds``; the metrics themselves are defined in ``service/metrics.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import REQUEST_DURATION, REQUESTS

UNMATCHED_ROUTE = "unmatched"


def route_template(scope: Scope) -> str:
    """The matched route's template (``/v1/models/{name}``), never the raw path: raw paths would
    put user-chosen strings in labels and make the series count unbounded."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class MetricsMiddleware:
    """Pure ASGI middleware counting and timing every HTTP request by route template/method/status.

    Pure ASGI (not ``BaseHTTPMiddleware``) so it adds no task hop per request and sees the status
    of every response, including the JSON errors written by the exception handlers."""

    def __init__(self, app: ASGIApp, clock: Callable[[], float] = time.perf_counter) -> None:
        self.app = app
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = self.clock()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_template(scope)
            method = scope.get("method", "GET")
            REQUESTS.labels(route, method, str(status)).inc()
            REQUEST_DURATION.labels(route, method).observe(self.clock() - start)
