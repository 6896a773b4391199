"""What a session is, and the small interface a session store implements.

A session holds everything needed to continue the text without re-reading it:

* ``state`` is the *lagged* recurrent state: the state after every committed token except the
  last one (``None`` for the zero state), and ``last_id`` is that last committed token (``<eos>``
  for a fresh session, whose model input then starts ``[<eos>, ...]`` from the zero state exactly
  like stateless prediction). Keeping the last token out of the state lets one delta run two rows
  from the same stored state in one batch: one that advances the state over the newly committed
  words (minus their last) and one that reads everything up to the word being typed.
* ``pending`` is the raw last chunk of the text when no whitespace follows it yet (its words may
  still change, so they are never committed), ``committed`` the count of committed words,
  ``context`` how many of them the state has read (fewer after a rebuild), and ``recent_words``
  the last ``NEXTWORD_SESSION_REBUILD_WORDS`` committed words, enough to rebuild the state on
  another model version.
* ``learn`` (adaptation on), ``learned`` (the last ``NEXTWORD_CACHE_WINDOW_WORDS`` + 2 committed
  words learned from: what the cache language model and new words read), and for suggestion
  rotation (``rotate``) the words already offered while typing the current word (``passed``) and
  the pending text they were offered for (``passed_for``).

Stores keep records (memory: the objects; Redis: a hash of compact JSON metadata plus the state as
raw float32 bytes), enforce the TTL, bound their size, remember recently gone ids (so a client is
told its session *expired* rather than never existed) and serialise updates of one session.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.sessions.errors import InvalidSessionIdError, SessionBusyError

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 32 characters, 192 random bits


def check_session_id(session_id: str) -> str:
    """Validate an id before it goes anywhere near a store key."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise InvalidSessionIdError()
    return session_id


@dataclass
class SessionRecord:
    id: str
    model: str
    version: int
    created: float
    last_used: float
    ttl: float
    k: int = 5
    pending: str = ""
    committed: int = 0
    context: int = 0
    recent_words: list[str] = field(default_factory=list)
    state: dict[str, np.ndarray] | None = None
    last_id: int = 0
    learn: bool = True
    rotate: bool = False
    learned: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    passed_for: str | None = None
    owner: str = ""  # who created it (a digest of the API key; "" without keys): only they may use it
    filter: bool = True  # leave blocklisted words out of this session's suggestions
    corrections: bool = True  # offer corrections of a mistyped fragment

    @property
    def expires_at(self) -> float:
        return self.last_used + self.ttl

    def copy(self) -> SessionRecord:
        """A copy safe to modify. Shallow: an update replaces a record's fields (the state dict
        and arrays, the word lists), never changes them in place, so the memory store's own
        record is untouched by an update that fails half-way. Rather than ``dataclasses.replace``,
        which re-runs ``__init__`` through introspection: the memory store copies twice per
        keystroke, and the learned-words list alone holds up to 2,002 words."""
        new = object.__new__(SessionRecord)
        new.__dict__.update(self.__dict__)
        return new


class SessionStore(Protocol):
    """Where sessions live. ``name`` is the metrics ``store`` label (``memory``/``redis``)."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, record: SessionRecord) -> None:
        """Store a new session (evicting another when the store is full)."""

    async def load(self, session_id: str) -> SessionRecord:
        """The session, or SessionNotFoundError / SessionExpiredError."""

    async def save(self, record: SessionRecord, lock: object) -> None:
        """Write an updated session back, under the lock taken by :meth:`lock`. Raises
        SessionNotFoundError if it was deleted meanwhile (the update is dropped)."""

    async def delete(self, session_id: str) -> bool:
        """Remove a session; False when there was none."""

    def lock(self, session_id: str) -> AbstractAsyncContextManager[object]:
        """Serialise updates of one session (across replicas for a shared store)."""

    async def sweep(self) -> None:
        """Reap expired sessions and refresh the active-sessions gauge."""

    async def secret(self) -> bytes:
        """A random key created once per store (shared by every replica of a shared store): the
        default key for deriving session ids from client-chosen ones."""


class KeyedLocks:
    """One asyncio lock per session id, alive only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def hold(self, key: str, timeout: float) -> _Held:
        return _Held(self, key, timeout)

    def __len__(self) -> int:
        return len(self._locks)


class _Held:
    """``async with locks.hold(key, timeout)``: a class rather than an ``asynccontextmanager``
    generator, and a free lock is taken without arming a timeout: this runs on every keystroke."""

    __slots__ = ("key", "lock", "locks", "timeout")

    def __init__(self, locks: KeyedLocks, key: str, timeout: float) -> None:
        self.locks, self.key, self.timeout = locks, key, timeout
        self.lock: asyncio.Lock | None = None

    async def __aenter__(self) -> None:
        table = self.locks._locks
        lock, users = table.get(self.key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        table[self.key] = (lock, users + 1)
        self.lock = lock
        try:
            if users:  # held or awaited by another update here: wait, at most the timeout
                async with asyncio.timeout(self.timeout):
                    await lock.acquire()
            else:
                await lock.acquire()  # nobody else: taken without suspending
        except TimeoutError:
            self._leave()
            raise SessionBusyError(self.key, self.timeout) from None
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        assert self.lock is not None
        self.lock.release()
        self._leave()

    def _leave(self) -> None:
        table = self.locks._locks
        lock, users = table[self.key]
        if users <= 1:
            del table[self.key]
        else:
            table[self.key] = (lock, users - 1)
