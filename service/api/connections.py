"""Slow clients: a connection may not hold the server by trickling its request.

* **Headers** (``NEXTWORD_HEADER_TIMEOUT_SECONDS``, under ``nextword-serve``): a connection must
  complete a request's headers within the timeout, counted from connecting (first request) or
  from the request's first byte; else it is closed. uvicorn itself only times out idle keep-alive
  connections, so one that connects and sends nothing, or a byte a second, was held forever.
* **Bodies** (``NEXTWORD_BODY_TIMEOUT_SECONDS``, any server): the whole body must arrive within the
  timeout of the app's first read; else 408 ``request_timeout`` and the connection closes.
* **Connections** (``NEXTWORD_MAX_CONNECTIONS``): uvicorn's ``limit_concurrency`` answers 503 past it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine.errors import ServiceError


class RequestTimeoutError(ServiceError):
    type = "request_timeout"
    status = 408


class BodyTimeout:
    """Pure ASGI middleware: the request body must be complete ``timeout`` seconds after the app
    first asks for it. Reads after the body (disconnect polling of streams) are not limited."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        complete = False
        timed_out = False

        async def timed_receive() -> Message:
            nonlocal deadline, complete, timed_out
            if complete:
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + self.timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                timed_out = True
                raise RequestTimeoutError(
                    f"the request body did not arrive within {self.timeout:g} s (NEXTWORD_BODY_TIMEOUT_SECONDS)"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        async def closing_send(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                # uvicorn keeps a connection whose body was never read; this one must go.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed_receive, closing_send)


def header_timeout_protocol(timeout: float) -> type[Any] | None:
    """uvicorn's httptools protocol with a header timeout (``None`` if httptools is missing: uvicorn
    then uses h11, without one)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # a request's first byte: its headers are due within the timeout

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
