"""The keystroke cache: each session's last next-word distribution, so that typing inside a word
costs no model work.

About five of every six keystrokes only change the fragment being typed; the committed words, and
so the distribution the fragment is completed from, stay the same. The session manager keeps the
row it computed last (the session's *final* distribution, before prefix selection) here, and an
update that commits no word is answered from it: only the prefix selection runs.

The cache is an optimisation, never a source of truth:

* An entry is used only if everything the row was computed from is unchanged: the very model
  version object (a version unloaded or rewritten in place is a new object), the stored recurrent
  state (the same arrays, or equal contents when the store decoded a fresh copy), and the
  manager's ``stamp`` (last token, the words of the pending chunk before the fragment, the
  committed counts, per-session adjustments). Anything else is a miss, which recomputes from the
  stored state: another replica served the last update, the entry was evicted, the process
  restarted, the model changed.
* It holds at most ``max_bytes`` (``NEXTWORD_SESSION_ROW_CACHE_BYTES``), least recently used out
  first. An entry costs its row (``4 × vocabulary size`` bytes), the session's new words offered
  beside it, its state arrays, the vocabulary ids of the words the session has learned (4 bytes a
  word, at most ``NEXTWORD_CACHE_WINDOW_WORDS`` + 2) and :data:`ENTRY_OVERHEAD_BYTES` of bookkeeping.

A stamp is a pair ``(history, view)``: ``history`` identifies the committed text (with the state
arrays), ``view`` what else the row depends on. The learned words' ids depend on the history alone,
so a commit reuses them (:meth:`RowCache.learned_ids`) and encodes only its new words: the cost of
a commit does not grow with the length of the session.

Event-loop only (no locks): the manager calls it between awaits.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import metrics
from service.engine.cache_lm import AdaptedRow

# The Python objects around the arrays (entry, dict slot, weakref, stamp tuple, array header):
# ~0.3 KB per entry measured with tracemalloc over 1,000 brown-lstm entries; counted as 1 KB so
# that a longer stamp or fragment stays within the bound.
ENTRY_OVERHEAD_BYTES = 1024

_HIT, _MISS = metrics.ROW_CACHE_LOOKUPS.labels("hit"), metrics.ROW_CACHE_LOOKUPS.labels("miss")


@dataclass(slots=True)
class _Entry:
    model: weakref.ref[Any]
    stamp: Hashable
    state: dict[str, np.ndarray] | None
    row: AdaptedRow
    learned_ids: np.ndarray | None
    nbytes: int


def entry_bytes(row: AdaptedRow, state: dict[str, np.ndarray] | None, learned_ids: np.ndarray | None = None) -> int:
    """What one cached session costs (the figure the byte bound counts); a new word is counted
    as its UTF-8 bytes plus 64 for the string object and its log-probability."""
    words = sum(len(w.encode()) + 64 for w in row.new_words) + sum(len(w.encode()) + 64 for w in row.new_written)
    learned = learned_ids.nbytes if learned_ids is not None else 0
    rows = sum(a.nbytes for a in (row.log_probs, row.ranked_log_probs) if a is not None)
    return rows + words + sum(a.nbytes for a in (state or {}).values()) + learned + ENTRY_OVERHEAD_BYTES


def _own(values: np.ndarray) -> np.ndarray:
    """A read-only float32 row not shared with anything else (a copy unless it already is one)."""
    if values.base is not None or values.dtype != np.float32:
        values = np.array(values, dtype=np.float32, copy=True)
    values.flags.writeable = False
    return values


def _same_state(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.keys() != b.keys():
        return False
    # The memory store hands back the very arrays it was given: identity settles it without
    # reading them. A store that decodes (Redis) gives equal copies: compare the contents.
    return all(a[k] is b[k] or np.array_equal(a[k], b[k]) for k in a)


class RowCache:
    """Per-session cached distribution rows, bounded in bytes, LRU."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str, model: object, stamp: tuple[Hashable, Hashable],
            state: dict[str, np.ndarray] | None) -> AdaptedRow | None:
        """The row cached for this session if it was computed from exactly these inputs."""
        entry = self._computed_from(session_id, model, stamp[0], state)
        if entry is not None and entry.stamp[1] == stamp[1]:
            self._entries.move_to_end(session_id)
            _HIT.inc()
            return entry.row
        _MISS.inc()
        return None

    def learned_ids(self, session_id: str, model: object, history: Hashable,
                    state: dict[str, np.ndarray] | None) -> np.ndarray | None:
        """The ids of the session's learned words as cached with its row, if that row's history
        (and state) is this one: whatever the pending fragment was then. Not counted as a lookup."""
        entry = self._computed_from(session_id, model, history, state)
        return entry.learned_ids if entry is not None else None

    def _computed_from(self, session_id: str, model: object, history: Hashable,
                       state: dict[str, np.ndarray] | None) -> _Entry | None:
        """The session's entry if it was computed on ``model`` from this history and state."""
        entry = self._entries.get(session_id)
        if (entry is not None and entry.model() is model and entry.stamp[0] == history
                and _same_state(entry.state, state)):
            return entry
        return None

    def put(self, session_id: str, model: object, stamp: tuple[Hashable, Hashable],
            state: dict[str, np.ndarray] | None, row: AdaptedRow, learned_ids: np.ndarray | None = None) -> None:
        """Remember ``row``: only its ranked vocabulary row when it has one (what selection reads;
        a new array, never shared with the batch), else its row by id (copied when it is a view:
        batch rows are views into a whole batch's output); and, when given, the ids of the learned
        words it was computed from (kept as given: the caller hands over an array it no longer
        changes)."""
        if not self.enabled:
            return
        ranked, values = row.ranked_log_probs, row.log_probs
        if ranked is not None:
            ranked, values = _own(ranked), None
        else:
            assert values is not None
            values = _own(values)
        own = AdaptedRow(values, row.new_words, np.array(row.new_log_probs, copy=True), row.new_written, ranked)
        nbytes = entry_bytes(own, state, learned_ids)
        self.drop(session_id)
        if nbytes > self.max_bytes:
            return
        while self._bytes + nbytes > self.max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self._account(-oldest.nbytes, -1)
            metrics.ROW_CACHE_EVICTIONS.inc()
        self._entries[session_id] = _Entry(weakref.ref(model), stamp, state, own, learned_ids, nbytes)
        self._account(nbytes, 1)

    def drop(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._account(-entry.nbytes, -1)

    def clear(self) -> None:
        self._account(-self._bytes, -len(self._entries))
        self._entries.clear()

    def _account(self, nbytes: int, entries: int) -> None:
        # Deltas, not set(): several apps in one process (tests) share the module-level gauges.
        self._bytes += nbytes
        metrics.ROW_CACHE_BYTES.inc(nbytes)
        metrics.ROW_CACHE_ENTRIES.inc(entries)
