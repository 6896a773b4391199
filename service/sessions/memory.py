"""The in-memory session store (the default): this process only, bounded, LRU-evicting.

Records live in an ``OrderedDict`` in least-recently-updated order. Creating a session in a full
store evicts the least recently used one; a session idle past its TTL is expired when it is next
touched or by the periodic sweep. Gone ids are remembered (bounded, for a day) so a client is told
its session expired or was evicted rather than that it never existed. Updates of one session are
serialised by an asyncio lock (the event loop is the only writer).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from contextlib import AbstractAsyncContextManager

from service import metrics
from service.sessions.errors import SessionExpiredError, SessionNotFoundError
from service.sessions.store import KeyedLocks, SessionRecord

TOMBSTONE_SECONDS = 86_400.0


class MemoryStore:
    name = "memory"

    def __init__(self, max_sessions: int, lock_timeout: float = 5.0, clock=time.time) -> None:
        self.max_sessions = max_sessions
        self.lock_timeout = lock_timeout
        self.clock = clock
        self._sessions: OrderedDict[str, SessionRecord] = OrderedDict()
        self._gone: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (reason, forget at)
        self._locks = KeyedLocks()
        self._active = metrics.SESSIONS_ACTIVE.labels(self.name)
        self._secret = secrets.token_bytes(32)

    async def start(self) -> None:
        return None

    async def secret(self) -> bytes:
        return self._secret

    async def close(self) -> None:
        self._active.dec(len(self._sessions))
        self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)

    # --- bookkeeping ----------------------------------------------------------------------------

    def _remove(self, session_id: str, reason: str) -> None:
        """Drop a live session, remembering why (``expired``/``evicted``; ``deleted`` is forgotten)."""
        if self._sessions.pop(session_id, None) is None:
            return
        self._active.dec()
        if reason == "expired":
            metrics.SESSIONS_EXPIRED.labels(self.name).inc()
        elif reason == "evicted":
            metrics.SESSIONS_EVICTED.labels(self.name).inc()
        if reason != "deleted":
            self._gone[session_id] = (reason, self.clock() + TOMBSTONE_SECONDS)
            self._gone.move_to_end(session_id)
            while len(self._gone) > max(self.max_sessions, 1024):
                self._gone.popitem(last=False)

    def _live(self, session_id: str) -> SessionRecord:
        record = self._sessions.get(session_id)
        if record is not None and record.expires_at <= self.clock():
            self._remove(session_id, "expired")
            record = None
        if record is None:
            gone = self._gone.get(session_id)
            if gone is not None and gone[1] > self.clock():
                raise SessionExpiredError(session_id, gone[0])
            raise SessionNotFoundError(session_id)
        return record

    # --- the store interface --------------------------------------------------------------------

    async def create(self, record: SessionRecord) -> None:
        while len(self._sessions) >= self.max_sessions:
            oldest_id, oldest = next(iter(self._sessions.items()))
            self._remove(oldest_id, "expired" if oldest.expires_at <= self.clock() else "evicted")
        self._sessions[record.id] = record.copy()
        self._active.inc()
        metrics.SESSIONS_CREATED.labels(self.name).inc()

    async def load(self, session_id: str) -> SessionRecord:
        return self._live(session_id).copy()

    async def save(self, record: SessionRecord, lock: object) -> None:
        self._live(record.id)  # deleted or expired meanwhile: the update is dropped
        self._sessions[record.id] = record.copy()
        self._sessions.move_to_end(record.id)

    async def delete(self, session_id: str) -> bool:
        try:
            self._live(session_id)
        except (SessionNotFoundError, SessionExpiredError):
            return False
        self._remove(session_id, "deleted")
        metrics.SESSIONS_DELETED.labels(self.name).inc()
        return True

    def lock(self, session_id: str) -> AbstractAsyncContextManager[object]:
        return self._locks.hold(session_id, self.lock_timeout)

    async def sweep(self) -> None:
        now = self.clock()
        for session_id in [sid for sid, r in self._sessions.items() if r.expires_at <= now]:
            self._remove(session_id, "expired")
        while self._gone:
            oldest_id, (_, forget_at) = next(iter(self._gone.items()))
            if forget_at > now:
                break
            del self._gone[oldest_id]
