"""Stateful sessions, store-agnostic and HTTP-free: create, update with a text delta, read, delete.

An update is exact and its cost independent of the history: the new raw text is the session's
pending fragment plus the delta; ``split_text`` (chunk-local tokenization) says which words are
now final (``committed``, w of them), which are complete but revisable (``tail``) and which
fragment is being typed (``prefix``). From the stored lagged state two rows go to the version's
batcher in ONE ``run_many`` call (so they share a batch with each other and with other sessions'
rows):

* the *advance* row (only when w >= 1): ``[last_id, w1 .. w(w-1)]``, ``want_state`` -> the new
  lagged state, and ``w_w`` becomes ``last_id``;
* the *read* row: ``[last_id, w1 .. ww, tail ...]`` -> log-probs, then ``select(..., prefix)``
  exactly as stateless prediction does.

So the predictions after any sequence of deltas equal ``POST /v1/predict`` on the concatenated text
(as long as the text fits the stateless context budget ``NEXTWORD_CONTEXT_WORDS``; a session never
truncates). Each update costs O(w + tail) recurrent steps.

A session stays on the model version it was created with while that version is loaded. Once it
is not, the next update rebuilds the state on the model's serving version from the stored last
``NEXTWORD_SESSION_REBUILD_WORDS`` committed words (in the same single batched call: the rebuild
words simply precede the delta's words, from the zero state and ``<eos>``), and reports
``rebuilt``.

Keystrokes inside a word cost no model work: an update that commits no word (it appends letters
to the pending fragment, or changes it with ``replace_pending``, backspace included) needs the
same distribution as the update before it, so the manager answers it from the row it kept in
:class:`~service.sessions.row_cache.RowCache` (only the prefix selection runs). The cache is
checked against the stored state on every use and recomputes on any doubt, so answers are the
same with it or without it (``NEXTWORD_SESSION_ROW_CACHE_BYTES=0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from nextword.text import SplitText, split_text
from service import metrics
from service.config import Settings
from service.engine import Engine
from service.engine.batcher import STEP, WorkItem, WorkResult
from service.engine.cache_lm import AdaptedRow
from service.engine.errors import ModelNotFoundError, VersionNotFoundError
from service.engine.predictor import adapt_row
from service.engine.repository import LoadedVersion
from service.engine.suggest import Candidate, SuggestOptions, Writing, select
from service.engine.swap import on_current_version
from service.sessions.errors import (
    DeltaTooLongError,
    InvalidSessionInputError,
    PendingTooLongError,
    SessionNotFoundError,
    SessionStoreUnavailableError,
)
from service.sessions.memory import MemoryStore
from service.sessions.redis_cluster import SCHEMES as CLUSTER_SCHEMES
from service.sessions.redis_cluster import RedisClusterStore
from service.sessions.redis_store import RedisStore
from service.sessions.row_cache import RowCache
from service.sessions.store import SessionRecord, SessionStore, check_session_id, new_session_id

log = logging.getLogger("service.sessions")


@dataclass
class SessionResult:
    """A session after a create/update, with the predictions for its text."""

    record: SessionRecord
    candidates: list[Candidate]
    prefix: str
    prefix_probability: float
    matches: int
    context_words: int  # words the model read: committed words in the state + the pending tail
    rebuilt: bool


def create_store(settings: Settings) -> SessionStore:
    if settings.session_store == "memory":
        return MemoryStore(settings.max_sessions, settings.session_lock_timeout_seconds)
    cluster = settings.session_store.startswith(tuple(CLUSTER_SCHEMES))
    return (RedisClusterStore if cluster else RedisStore)(
        settings.session_store, settings.max_sessions, lock_timeout=settings.session_lock_timeout_seconds,
        lock_lease=settings.session_lock_lease_seconds, timeout=settings.session_store_timeout_seconds,
    )


class SessionManager:
    def __init__(self, engine: Engine, settings: Settings, store: SessionStore | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self._store = store
        self.rows = RowCache(settings.session_row_cache_bytes)
        self._sweeper: asyncio.Task | None = None
        self._stopping = asyncio.Event()  # replaced in start(): an Event belongs to one event loop

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            raise RuntimeError("the session manager is not started")
        return self._store

    async def start(self) -> None:
        if self._store is None:
            self._store = create_store(self.settings)
        await self._store.start()
        self._stopping = asyncio.Event()
        interval = self.settings.session_sweep_interval_seconds
        if interval > 0 and self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(interval), name="session-sweeper")

    async def close(self) -> None:
        self._stopping.set()
        if self._sweeper is not None:
            # The stop flag ends the loop even if a cancellation gets lost inside a store call.
            sweeper, self._sweeper = self._sweeper, None
            _, pending = await asyncio.wait({sweeper}, timeout=2 * self.settings.session_store_timeout_seconds + 1)
            if pending:
                sweeper.cancel()
                await asyncio.wait({sweeper}, timeout=1)
        self.rows.clear()
        if self._store is not None:
            await self._store.close()

    async def _sweep_forever(self, interval: float) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self._stopping.is_set():
                return
            try:
                await self.store.sweep()
            except SessionStoreUnavailableError:
                pass  # counted and logged by the store
            except Exception:  # a sweep bug must not stop the sweeper
                log.exception("session sweep failed")

    # --- checks ---------------------------------------------------------------------------------

    async def derived_id(self, prefix: str, *parts: str) -> str:
        """A session id for a client-chosen name (``parts``), in the session id alphabet: an HMAC
        under ``NEXTWORD_SESSION_SECRET`` (or the store's random key), so the same parts always
        give the same session on every replica and nobody without the key can compute it."""
        configured = self.settings.session_secret
        key = configured.get_secret_value().encode() if configured is not None else await self.store.secret()
        digest = hmac.new(key, "\0".join(parts).encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        return prefix + digest[:40]

    def ttl(self, ttl_seconds: float | None) -> float:
        if ttl_seconds is None:
            return self.settings.session_ttl_seconds
        limit = self.settings.session_max_ttl_seconds
        if not 1 <= ttl_seconds <= limit:
            raise InvalidSessionInputError(
                f"ttl_seconds must be between 1 and {limit:g} (NEXTWORD_SESSION_MAX_TTL_SECONDS)", "ttl_seconds"
            )
        return float(ttl_seconds)

    def _check_delta(self, value: str | None, field: str) -> None:
        if value is None:
            return
        limit = self.settings.max_delta_chars
        if len(value) > limit:
            raise DeltaTooLongError(len(value), limit, field)
        self.engine.predictor.check_text(value, field)  # unpaired surrogates

    # --- operations -----------------------------------------------------------------------------

    async def create(
        self, model: str | None = None, version: int | None = None, text: str = "", k: int = 5,
        ttl_seconds: float | None = None, session_id: str | None = None, learn: bool = True,
        rotate: bool | None = None, owner: str = "", options: SuggestOptions | None = None,
    ) -> SessionResult:
        """A new session (a random id unless ``session_id`` is given; an existing session with
        that id must be deleted first). ``learn=False``: no adaptation for the session's whole
        life; ``rotate``: suggestion rotation (default ``NEXTWORD_SUGGESTION_ROTATION``);
        ``options`` (blocklist filter, corrections) become the session's defaults. The session
        belongs to ``owner``."""
        self.engine.predictor.check_text(text)
        ttl = self.ttl(ttl_seconds)
        lv = self.engine.repository.resolve(model, version)
        now = time.time()
        sid = check_session_id(session_id) if session_id is not None else new_session_id()
        record = SessionRecord(
            id=sid, model=lv.name, version=lv.version, created=now, last_used=now, ttl=ttl, k=k,
            state=None, last_id=lv.eos_id, learn=learn, owner=owner,
            rotate=self.settings.suggestion_rotation if rotate is None else rotate,
        )
        if options is not None:
            record.filter, record.corrections = options.filter, options.corrections
        result = await self._advance(record, text, k)
        result.rebuilt = False  # nothing to rebuild from; a version swap during creation just moved it
        record.last_used = time.time()
        await self.store.create(record)
        return result

    async def update(
        self, session_id: str, text: str | None = None, replace_pending: str | None = None, k: int | None = None,
        transport: str = "http", learn: bool = True, owner: str | None = None, filter: bool | None = None,
        corrections: bool | None = None,
    ) -> SessionResult:
        """Append ``text`` to the session (after replacing its pending fragment with
        ``replace_pending`` when given) and predict the next word. ``learn=False``: this update is
        not adapted to and its words are not learned from. ``filter`` / ``corrections`` override
        the session's own for this update."""
        check_session_id(session_id)
        # Neither text nor replace_pending: the session's predictions again (e.g. with another k).
        self._check_delta(text, "text")
        self._check_delta(replace_pending, "replace_pending")
        start = time.perf_counter()
        try:
            async with self.store.lock(session_id) as lock:
                record = _owned(await self.store.load(session_id), owner)
                base = record.pending if replace_pending is None else replace_pending
                options = SuggestOptions(record.filter if filter is None else filter,
                                         record.corrections if corrections is None else corrections)
                result = await self._advance(record, base + (text or ""), k or record.k, learn, options)
                record.last_used = time.time()
                await self.store.save(record, lock)
                return result
        finally:
            _update_duration(transport).observe(time.perf_counter() - start)

    async def get(self, session_id: str, owner: str | None = None) -> SessionRecord:
        return _owned(await self.store.load(check_session_id(session_id)), owner)

    async def delete(self, session_id: str, owner: str | None = None) -> None:
        check_session_id(session_id)
        if owner is not None:
            _owned(await self.store.load(session_id), owner)
        self.rows.drop(session_id)
        if not await self.store.delete(session_id):
            # Known-but-gone ids answer session_expired; deleted or unknown ones session_not_found.
            await self.store.load(session_id)
            raise SessionNotFoundError(session_id)

    # --- the model work -------------------------------------------------------------------------

    def _own_version(self, record: SessionRecord) -> LoadedVersion | None:
        """The version the session's state was computed on, if it is still loaded."""
        try:
            return self.engine.repository.resolve(record.model, record.version)
        except (ModelNotFoundError, VersionNotFoundError):
            return None

    def _version_for(self, record: SessionRecord) -> tuple[LoadedVersion, bool]:
        """The session's own version if loaded and its state fits, else the serving one (rebuild)."""
        lv = self._own_version(record)
        if lv is None:
            return self.engine.repository.resolve(record.model), True
        return lv, not _fits(lv, record)

    def adjust_row(self, lv: LoadedVersion, record: SessionRecord, log_probs: np.ndarray, tail: list[str],
                   learn: bool, learned_ids: np.ndarray) -> AdaptedRow:
        """The session's final next-word distribution from the model's row, before prefix
        selection: the cache language model over the words learned so far (whose ids are
        ``learned_ids``) and the pending chunk's complete words, and the session's new words
        (``service/engine/cache_lm.py``; the same context words as stateless prediction reads).
        What it returns is what the keystroke cache keeps; whatever it reads from ``record`` must
        be in :meth:`stamp` (``learned`` follows from the committed words)."""
        if not learn:
            return adapt_row(lv, self.settings, log_probs, [], [], learn)
        ids = np.concatenate([learned_ids, _lower_ids(lv, tail)]) if tail else learned_ids
        # the words as written (new words are offered so), the model's ids from their lowercase
        return adapt_row(lv, self.settings, log_probs, record.learned + tail, ids, learn)

    @staticmethod
    def history(record: SessionRecord) -> Hashable:
        """What identifies the session's committed text besides its state arrays (and so the
        words it has learned)."""
        return record.last_id, record.committed, record.context

    @classmethod
    def stamp(cls, record: SessionRecord, tail: list[str], learn: bool) -> tuple[Hashable, Hashable]:
        """Everything besides the model version and the state arrays that the final row depends
        on, as ``(history, view)``: the committed text, and the pending chunk's words and whether
        this update adapts. A cached row is reused only while both are unchanged."""
        return cls.history(record), (tuple(tail), learn)

    async def _advance(self, record: SessionRecord, raw: str, k: int, learn: bool = True,
                       options: SuggestOptions | None = None) -> SessionResult:
        split = split_text(raw)
        written, tail = split.written(raw)  # committed and tail words as typed (case kept)
        learn = learn and record.learn
        if options is None:
            options = SuggestOptions(record.filter, record.corrections)
        # The last committed words say whether the next word starts a sentence.
        writing = Writing.of(raw, split, before=record.recent_words[-4:])
        if len(split.pending) > self.settings.max_text_chars:
            raise PendingTooLongError(len(split.pending), self.settings.max_text_chars)
        if not split.committed and self.rows.enabled:
            # A cached row was computed on this very version object from this very state, so the
            # state fits it (no _fits check); a version gone or replaced is simply a miss.
            lv = self._own_version(record)
            if lv is not None:
                row = self.rows.get(record.id, lv, self.stamp(record, tail, learn), record.state)
                if row is not None:
                    record.pending = split.pending
                    return self._result(lv, record, row, k, split, writing, options, rebuilt=False)

        async def submit(choice: tuple[LoadedVersion, bool]) -> _Submitted:
            lv, rebuilt = choice
            if rebuilt:
                base, state, last_id = list(record.recent_words), None, lv.eos_id
            else:
                base, state, last_id = [], record.state, record.last_id
            words, tail = base + split.committed, split.tail
            budget = self.settings.context_words
            restarted = len(words) + len(tail) > budget
            if restarted:
                # A paste longer than the context budget (at most NEXTWORD_MAX_TEXT_CHARS, some
                # 25,000 words: read whole, twice, it took longer than the deadline): its last
                # words from a fresh state, as /v1/predict reads a long text.
                keep = max(budget - len(tail), 0)
                words, tail, state, last_id = words[len(words) - keep:], tail[-budget:], None, lv.eos_id
            n = len(words)
            ids = np.asarray(lv.vocab.encode(words + tail), dtype=np.int64)
            head = np.asarray([last_id], dtype=np.int64)
            # Under keyboard load a step waits a little for other sessions' steps: one onnxruntime
            # call costs about the same for one row as for a few (the decoder's weights are read
            # once); a lone client's steps, however fast, never wait, nor those of one client
            # taking turns between sessions (service/engine/batcher.py, Pace).
            with lv.batcher.pace.step(record.id, self.settings.session_queue_delay_ms / 1000) as delay:
                read = WorkItem(np.concatenate([head, ids]), state=state, label=STEP, max_delay=delay)
                items = [read]
                if n:
                    advance = WorkItem(np.concatenate([head, ids[: n - 1]]), state=state, want_state=True,
                                       want_log_probs=False, label=STEP, max_delay=delay)
                    items = [advance, read]
                outputs = await lv.batcher.run_many(items)
            return _Submitted(lv, rebuilt, len(base), ids, n, outputs, restarted)

        lv, rebuilt, base_words, ids, n, outputs, restarted = await on_current_version(
            lambda: self._version_for(record), submit
        )
        assert outputs[-1].log_probs is not None
        # The ids of the words learned so far, as cached with the last row of this very history
        # (before this update changes it): a commit then encodes only its own words.
        learned_ids = None if rebuilt else self.rows.learned_ids(record.id, lv, self.history(record), record.state)
        if learned_ids is not None and learned_ids.size != len(record.learned):
            learned_ids = None
        if n:
            record.state, record.last_id = outputs[0].next_state, int(ids[n - 1])
        elif rebuilt:
            record.state, record.last_id = None, lv.eos_id
        if rebuilt:
            log.info("session rebuilt on %s v%d from %d recent words (was v%d)", lv.name, lv.version,
                     base_words, record.version)
            record.version, record.context = lv.version, base_words
        record.context = n if restarted else record.context + len(split.committed)
        record.committed += len(split.committed)
        keep = self.settings.session_rebuild_words
        record.recent_words = (record.recent_words + split.committed)[-keep:]
        if learn and self.settings.adaptation and self.settings.cache_window_words > 0 and written:
            keep = self.settings.cache_window_words + 2
            record.learned = (record.learned + written)[-keep:]
            if learned_ids is not None:
                learned_ids = np.concatenate([learned_ids, _lower_ids(lv, written)])[-keep:]
        if learned_ids is None:
            learned_ids = _lower_ids(lv, record.learned)
        record.pending = split.pending
        row = self.adjust_row(lv, record, outputs[-1].log_probs, tail, learn, learned_ids)
        row.ranked(lv.index)  # what the keystrokes of this word select from, and all the cache keeps
        self.rows.put(record.id, lv, self.stamp(record, tail, learn), record.state, row, learned_ids)
        return self._result(lv, record, row, k, split, writing, options, rebuilt)

    def _result(self, lv: LoadedVersion, record: SessionRecord, row: AdaptedRow, k: int, split: SplitText,
                writing: Writing, options: SuggestOptions, rebuilt: bool) -> SessionResult:
        exclude = self._passed_over(record, split)
        candidates, top = select(lv, row, k, split.prefix, writing, options, exclude)
        if record.rotate:
            record.passed = [*sorted(exclude), *(c.word for c in candidates)]
            record.passed_for = split.pending
        return SessionResult(
            record=record, candidates=candidates, prefix=split.prefix, prefix_probability=top.mass,
            matches=top.matches, context_words=record.context + len(split.tail), rebuilt=rebuilt,
        )

    @staticmethod
    def _passed_over(record: SessionRecord, split: SplitText) -> frozenset[str]:
        """Suggestion rotation: the words already offered for the word being typed, when this
        update only extends it (no word committed, the pending text grows), else none."""
        if not record.rotate or split.committed or record.passed_for is None:
            return frozenset()
        if len(split.pending) <= len(record.passed_for) or not split.pending.startswith(record.passed_for):
            return frozenset()
        return frozenset(record.passed)


def _lower_ids(lv: LoadedVersion, words: list[str]) -> np.ndarray:
    """The vocabulary ids of ``words`` read in lowercase (how the cache counts them), as int32."""
    return np.asarray(lv.vocab.encode([w.lower() for w in words]), dtype=np.int32)


class _Submitted(NamedTuple):
    """One session step's model work, done on the version it ran on."""

    version: LoadedVersion
    rebuilt: bool
    base_words: int  # recent words re-read to rebuild the state on a new version
    ids: np.ndarray
    words: int  # words committed by the step (base included)
    outputs: list[WorkResult]
    restarted: bool  # the step read only the last NEXTWORD_CONTEXT_WORDS words, from a fresh state


@functools.cache
def _update_duration(transport: str) -> Any:
    """The histogram child of one transport (``labels()`` costs a lock and a dict look-up per call)."""
    return metrics.SESSION_UPDATE_DURATION.labels(transport)


def _owned(record: SessionRecord, owner: str | None) -> SessionRecord:
    """The record, if ``owner`` may use it (``None``: no check). Another key's session answers
    exactly like one that does not exist, so ids of other keys' sessions cannot be probed."""
    if owner is not None and not hmac.compare_digest(record.owner, owner):
        raise SessionNotFoundError(record.id)
    return record


def _fits(lv: LoadedVersion, record: SessionRecord) -> bool:
    """Whether the stored state can run on this version (a version rewritten in place may differ)."""
    if not 0 <= record.last_id < lv.card.vocab_size:
        return False
    if record.state is None:
        return True
    shape = (lv.card.num_layers, lv.card.hidden_size)
    names = list(lv.card.state_names)
    return sorted(record.state) == sorted(names) and all(tuple(record.state[n].shape) == shape for n in names)
