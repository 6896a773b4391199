"""Graceful shutdown of the serving process: what SIGTERM does under ``nextword-serve``.

Behind a load balancer (a Kubernetes Service, nginx), a terminating process still receives new
connections for a moment: the balancer learns of the termination at the same time as the
process. So on SIGTERM the process:

1. **drains** (:attr:`Drain.draining`): ``/readyz`` answers 503 ``{"draining": true}`` while
   everything else is served as usual, for ``NEXTWORD_SHUTDOWN_DELAY_SECONDS``, long enough for
   the balancer to stop sending it work (``/healthz`` stays 200: the process is not broken);
2. **closes its WebSockets** (:attr:`Drain.closing`): a stream waiting for its client's next
   message is closed at once, one with a message in flight right after its reply, both with
   close code 1012 (service restart). A message that got no reply before the close was never
   applied, so a client reconnects (to any replica: the session lives in the store) and resends
   those; new streams are refused with 1012;
3. **stops** as uvicorn does: no new connections; requests in flight finish (idle keep-alive
   connections close) within a deadline; then the lifespan shutdown stops the engine, which
   finishes the work already queued.

A second SIGTERM, or SIGINT (Ctrl-C), skips the delay; a second SIGINT exits at once.
Plain ``uvicorn service.main:app`` has uvicorn's own behaviour (steps 3 only, WebSockets closed
with 1012 even mid-reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Iterator
from types import FrameType
from typing import TypeVar

import uvicorn

log = logging.getLogger("service.api.shutdown")

T = TypeVar("T")

SERVICE_RESTART = 1012  # RFC 6455 registry: "the server is restarting; reconnect"


class StreamClosing(Exception):
    """Raised by :meth:`Drain.receive` when the process closes its streams."""


class Drain:
    """The process's shutdown state, read by ``/readyz`` and the WebSocket routes."""

    def __init__(self) -> None:
        self.draining = False
        self.closing = False
        self._waiting: set[asyncio.Timeout] = set()  # streams waiting for their client's next message
        self._streams = 0
        self._idle: asyncio.Event | None = None

    def begin(self) -> None:
        self.draining = True

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Count an open WebSocket for :meth:`close_streams` to wait for."""
        self._streams += 1
        try:
            yield
        finally:
            self._streams -= 1
            if self._streams == 0 and self._idle is not None:
                self._idle.set()

    async def receive(self, receive: Awaitable[T], timeout: float) -> T:
        """``receive``'s result; TimeoutError after ``timeout``; StreamClosing if the streams are
        closed first. A message that arrived is always returned, never dropped: the caller owes
        it a reply. (This runs once per keystroke: one deadline, no task per message. Closing
        moves the deadline of every stream waiting here to now; a receive cancelled that way
        leaves its message unread in the server's queue, never applied.)"""
        if self.closing:
            if inspect.iscoroutine(receive):
                receive.close()  # never started: nothing was read
            raise StreamClosing
        try:
            async with asyncio.timeout(timeout) as deadline:
                self._waiting.add(deadline)
                try:
                    return await receive
                finally:
                    self._waiting.discard(deadline)
        except TimeoutError:
            if self.closing:
                raise StreamClosing from None
            raise

    async def close_streams(self, timeout: float) -> None:
        """Tell the WebSockets to close; wait (at most ``timeout``) until they all have."""
        self.draining = self.closing = True
        now = asyncio.get_running_loop().time()
        for deadline in list(self._waiting):
            if not deadline.expired():
                deadline.reschedule(now)
        if self._streams:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        if self._streams:
            log.warning("%d WebSocket(s) still open after %g s; uvicorn closes them", self._streams, timeout)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining on SIGTERM as the module docstring says before it stops."""

    def __init__(self, config: uvicorn.Config, drain: Drain, delay: float, close_timeout: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.delay = delay
        self.close_timeout = close_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it may run between any two bytecodes of the event loop, so it only
        # hands the work to the loop.
        if self._loop is None or self._draining is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        delay = self.delay if sig == signal.SIGTERM else 0.0
        self._captured_signals.append(sig)  # uvicorn re-raises these after its shutdown
        self._loop.call_soon_threadsafe(self._start_draining, delay)

    def _start_draining(self, delay: float) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit(delay))

    async def _drain_then_exit(self, delay: float) -> None:
        start = time.monotonic()
        self.drain.begin()
        log.info("draining: /readyz answers 503 for %g s, then WebSockets close (1012) and the server stops", delay)
        try:
            if delay:
                await asyncio.sleep(delay)
            await self.drain.close_streams(self.close_timeout)
        finally:
            log.info("drained in %.1f s; stopping", time.monotonic() - start)
            self.should_exit = True
