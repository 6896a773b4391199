"""Stateful streaming sessions: server-held recurrent state, updated by text deltas.

``SessionManager`` (no HTTP) does the work over a ``SessionStore``: ``MemoryStore`` (default,
per process), ``RedisStore`` (``NEXTWORD_SESSION_STORE=redis://...``, shared by replicas) or
``RedisClusterStore`` (``redis+cluster://...``, the same on Redis Cluster). The
HTTP and WebSocket routes are in ``service.api.routes.sessions``; see ``docs/service.md``.
"""

from service.sessions.errors import SessionError
from service.sessions.manager import SessionManager, SessionResult, create_store
from service.sessions.memory import MemoryStore
from service.sessions.redis_cluster import RedisClusterStore
from service.sessions.redis_store import RedisStore
from service.sessions.store import SessionRecord, SessionStore, check_session_id

__all__ = [
    "MemoryStore", "RedisClusterStore", "RedisStore", "SessionError", "SessionManager", "SessionRecord",
    "SessionResult", "SessionStore", "check_session_id", "create_store",
]
