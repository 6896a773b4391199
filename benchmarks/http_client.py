"""A minimal keep-alive HTTP/1.1 client on asyncio streams, for the load generator.

The load generator shares the benchmark machine's cores with the server it measures, so every
microsecond it spends per request is taken from the server. A general client (httpx) costs about
0.7 ms of CPU per request here; this one writes a prebuilt request and reads one
``Content-Length`` response, about a tenth of that. It speaks just what uvicorn answers to
``POST``/``GET`` with a JSON or text body: no redirects, no chunked bodies, no TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit


class HTTPConnection:
    """One keep-alive connection; reconnects after an error or a ``Connection: close``."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"need an http://host:port URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_header = f"Host: {self.host}:{self.port}\r\n"

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def request_bytes(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
        """The wire form of a request; build it once and send it many times."""
        head = f"{method} {path} HTTP/1.1\r\n{self._host_header}"
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        return (head + "\r\n").encode("latin-1") + body

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send a prebuilt request; returns (status, body). Connection errors raise OSError.

        A kept-alive connection may have been closed by the server while idle (uvicorn's
        keep-alive timeout): such a request is sent once more on a fresh connection."""
        for attempt in (0, 1):
            reused = self._writer is not None
            try:
                return await asyncio.wait_for(self._exchange(raw), self.timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
                await self.close()
                stale = isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)) and reused
                if attempt or not stale:
                    raise OSError(f"HTTP exchange failed: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def _exchange(self, raw: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            await self._connect()
        assert self._reader is not None and self._writer is not None
        self._writer.write(raw)
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise ValueError("chunked responses are not supported by this client")
        if length is None and (status in (204, 304) or 100 <= status < 200):
            length = 0  # no body by definition (RFC 9110), with or without the header
        if length is None:
            raise ValueError("response without Content-Length")
        body = await self._reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
