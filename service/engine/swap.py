"""Surviving a hot swap: work submitted to a model version that was unloaded a moment after it was
looked up fails with :class:`BatcherClosedError`; looking the version up again finds its successor.
Every path that resolves a version and then submits work (stateless prediction and scoring,
generation's prompt, session updates) goes through :func:`on_current_version`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from service.engine.errors import BatcherClosedError

V = TypeVar("V")
T = TypeVar("T")

SWAP_ATTEMPTS = 3  # a version swapped twice during one request is not a swap, it is a reload loop


async def on_current_version(resolve: Callable[[], V], fn: Callable[[V], Awaitable[T]]) -> T:
    """``fn(resolve())``; if the version was unloaded in between (its batcher closed), resolve and
    run once more, so a swap never fails a request. ``fn`` must not have changed anything the
    caller keeps before its submission fails."""
    for attempt in range(SWAP_ATTEMPTS):
        target = resolve()
        try:
            return await fn(target)
        except BatcherClosedError:
            if attempt == SWAP_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0)  # let the swap finish publishing the new version
    raise AssertionError("unreachable")
