"""Faults and resource use of a real server process (``nextword-serve``): what a client can do to
it by holding connections, and what it keeps afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_idle_websockets_leave_no_memory_behind(model_repository: Path, start_server: Callable) -> None:
    """500 idle session streams opened together and closed, again and again: the process's RSS
    does not grow (with permessage-deflate each socket held zlib buffers that stayed in the heap)."""
    from websockets.asyncio.client import connect

    server = start_server(model_repository, cli=True)
    sid = httpx.post(server.url + "/v1/sessions", json={"model": "tiny", "text": "the "}).json()["session_id"]
    url = server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"

    async def open_and_close(count: int) -> None:
        sockets = []
        try:
            for _ in range(count):
                ws = await connect(url, open_timeout=30)  # offers permessage-deflate, as browsers do
                assert '"type":"session"' in (await ws.recv()).replace(" ", "")
                sockets.append(ws)
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
        await asyncio.sleep(0.5)

    # The first round sets the heap's high-water mark for 500 open sockets (~15 MB); after that,
    # rounds must reuse it, not add to it (with deflate every round added ~18 MB).
    asyncio.run(open_and_close(500))
    before = rss_mb(server.proc.pid)
    for _ in range(2):
        asyncio.run(open_and_close(500))
    growth = rss_mb(server.proc.pid) - before
    assert growth < 8, f"RSS grew {growth:.0f} MB after 1,000 more idle WebSockets were opened and closed"
