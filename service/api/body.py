"""The route classes that read a request body before FastAPI parses it.

The body is bounded by ``NEXTWORD_MAX_BODY_BYTES`` (413 ``payload_too_large``) and, for JSON
routes, must be UTF-8 (400 ``invalid_encoding``), so a bad byte gives a 400 naming the problem
rather than a generic parse failure; JSON nested deeper than ``MAX_JSON_DEPTH`` is refused before
parsing (400 ``invalid_json``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

import numpy as np
from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.engine.errors import ServiceError


class BodyError(ServiceError):
    """A request body rejected before parsing."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_


MAX_JSON_DEPTH = 32  # no request of any front end nests deeper than ~6
_QUOTE = ord('"')
_STEP = np.zeros(256, np.int8)  # +1 for an opening bracket, -1 for a closing one, by byte value
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


def json_too_deep(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why a JSON document nests too deeply to be parsed, or None. Python's parser recurses once
    per level: 2,000 nested brackets raised RecursionError (a 500, and a reset connection). This
    runs in C and numpy (a 1 MB body costs a few ms): escapes are dropped, every remaining quote
    toggles "inside a string", and brackets outside strings are counted."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return None
    codes = np.frombuffer(raw.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    outside = (np.cumsum(codes == _QUOTE, dtype=np.int32) & 1) == 0
    depth = int(np.cumsum(_STEP[codes] * outside, dtype=np.int32).max(initial=0))
    return f"JSON nested {depth} levels deep; the limit is {limit}" if depth > limit else None


class CheckedRoute(APIRoute):
    """An APIRoute that reads the body itself first: bounded by ``max_body_bytes`` (413) and
    strictly UTF-8 (400 ``invalid_encoding``), then hands the cached body to FastAPI's parser."""

    require_utf8: ClassVar[bool] = True

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                settings = getattr(request.app.state, "settings", None)
                limit = settings.max_body_bytes if settings is not None else 1 << 20
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise BodyError(413, "payload_too_large", f"request body is {declared} bytes; the limit is {limit}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise BodyError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
                request._body = body  # Starlette's cache: FastAPI's parser reads it from here
                if not self.require_utf8:
                    return await handler(request)
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BodyError(
                        400, "invalid_encoding", f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
                    ) from None
                too_deep = json_too_deep(body)
                if too_deep:
                    raise BodyError(400, "invalid_json", too_deep)
            return await handler(request)

        return checked


class BinaryBodyRoute(CheckedRoute):
    """A :class:`CheckedRoute` for bodies that may carry binary data (the KServe binary tensor
    extension): size-bounded but not required to be UTF-8; the handler parses them itself."""

    require_utf8 = False
