"""Dynamic batching: work items that arrive together for one model version become one onnxruntime call.

The batcher is generic over what an item asks of the model, so stateless prediction, scoring and
stateful sessions/generation share one queue (and its worker threads) per model version:

* a :class:`WorkItem` carries its token ids, optionally its *initial recurrent state* (one
  ``[layers, hidden]`` array per state name, ``None`` for zeros), which graph to run and which
  outputs it wants (log-probs, next state);
* the worker right-pads the rows into ``tokens [batch, time]`` + ``lengths`` (the graphs make every
  row exact whatever the padding), gathers states into ``[layers, batch, hidden]``, runs once and
  scatters ``log_probs`` rows, ``target_*`` rows and ``next_state_*`` rows back per item
  (:class:`WorkResult`).

Policy (Triton-style): the oldest waiting item waits at most ``max_queue_delay`` for companions
(an item may carry its own ``max_delay``: session steps under keyboard load, see
``service/sessions/manager.py``; the batch starts at the earliest of the queued items' times);
a batch holds at most ``max_batch_size`` rows and ``max_batch_tokens`` padded tokens (score batches
``max_score_tokens``: that graph's intermediates are tokens x vocabulary); items of the other graph
wait for the next round. The queue is bounded (:class:`QueueFullError` when full) and
every item has a deadline: an item still queued past it is failed with
:class:`DeadlineExceededError` instead of being run for a client that has given up.

Workers are plain threads, so onnxruntime (which releases the GIL) never blocks the event loop.
There are ``workers`` of them (``NEXTWORD_INFERENCE_WORKERS``) taking batches from the one
queue: a batch that starts alone with nothing queued runs on the full intra-op pool; one that
overlaps another runs on the runtime's narrower sessions. On a small CPU this keeps the model
computing on one core while the event loop parses and answers HTTP on the other, instead of
two full-width pools and the event loop contending for the same cores.

Callers on the event loop ``await batcher.run(item)``; other threads use ``submit()`` and the
returned ``concurrent.futures.Future``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from nextword import artifact as A
from service import metrics
from service.engine.errors import BatcherClosedError, DeadlineExceededError, EngineError, QueueFullError
from service.engine.runtime import ModelRuntime

log = logging.getLogger("service.engine.batcher")

PREDICT = "predict"
SCORE = "score"
STEP = "step"  # metrics label for session/generation steps (they run the predict graph)


@dataclass(eq=False)
class WorkItem:
    """One row of a future batch.

    ``tokens``: word ids, at least one. ``graph``: ``"predict"`` (log-probs after the last token)
    or ``"score"`` (log-prob and rank of ``targets[t]`` after ``tokens[:t+1]``; ``targets`` as long
    as ``tokens``). ``state``: the recurrent state before ``tokens[0]``, ``{name: [layers, hidden]}``
    for every name in the card's ``state_names``, or ``None`` for the zero state of a fresh context.
    ``want_state``: return ``next_state_*`` rows (sessions keep them). ``want_log_probs``: predict
    only; a pure state-advance step may skip copying the vocabulary-wide row. ``label``: the
    ``graph`` label used in metrics (``"step"`` for session steps); defaults to ``graph``.
    ``max_delay``: the longest this item waits for companions (seconds); ``None``: the batcher's
    ``max_queue_delay``.
    """

    tokens: np.ndarray
    graph: str = PREDICT
    state: dict[str, np.ndarray] | None = None
    targets: np.ndarray | None = None
    want_state: bool = False
    want_log_probs: bool = True
    label: str | None = None
    max_delay: float | None = None
    # Filled in by the batcher.
    future: concurrent.futures.Future[WorkResult] = field(default_factory=concurrent.futures.Future, repr=False)
    enqueued_at: float = 0.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64).reshape(-1)
        if self.targets is not None:
            self.targets = np.asarray(self.targets, dtype=np.int64).reshape(-1)

    @property
    def metric_label(self) -> str:
        return self.label or self.graph


@dataclass
class WorkResult:
    """What one item gets back. Arrays are rows of the batch outputs: treat them as read-only
    (``log_probs`` is a view into the shared batch array; ``next_state`` rows are copies you own)."""

    log_probs: np.ndarray | None = None  # predict: [vocab] float32
    target_log_probs: np.ndarray | None = None  # score: [n] float32
    target_ranks: np.ndarray | None = None  # score: [n] int64
    next_state: dict[str, np.ndarray] | None = None  # {name: [layers, hidden]} when want_state
    queue_wait: float = 0.0  # seconds between submission and the start of its batch
    batch_size: int = 1  # rows in the onnxruntime call that computed it


class Pace:
    """Whether a session's step arriving now would find companions if it waited a little. Two
    running averages, event-loop side only:

    * the gap between consecutive steps of *different* sources (sessions): while other sources'
      steps come more often than the wait, one likely arrives within it;
    * the share of recent steps during which another source's step arrived (they overlapped):
      steps that come often but one after another (one client taking turns between its
      sessions, each step sent when the last is answered) never overlap, and waiting would only
      add the wait. Under keyboard load most steps overlap.

    A single source never counts as company (its next step cannot come before this one is
    answered)."""

    SMOOTHING = 0.1  # weight of the newest observation: about the last ten steps count
    COMPANY = 0.25  # the share of overlapping steps from which a step waits

    def __init__(self) -> None:
        self.gap = 1.0  # seconds, capped at 1: idle
        self.overlap = 0.0
        self.waiting = False  # the latest step waited for companions: keyboard load
        self._last = 0.0
        self._source: Hashable = None
        self._arrivals = 0

    def delay(self, source: Hashable, wait: float) -> float | None:
        """``wait`` if a step from ``source`` arriving now should wait for companions, else None."""
        now = time.monotonic()
        if source != self._source:
            self.gap += self.SMOOTHING * (min(now - self._last, 1.0) - self.gap)
        self._last, self._source = now, source
        self._arrivals += 1
        self.waiting = wait > 0 and self.gap < wait and self.overlap >= self.COMPANY
        return wait if self.waiting else None

    @contextlib.contextmanager
    def step(self, source: Hashable, wait: float) -> Iterator[float | None]:
        """:meth:`delay` for a step from ``source``; when the block ends (the step answered),
        whether another step arrived meanwhile counts towards :attr:`overlap`."""
        delay = self.delay(source, wait)
        ticket = self._arrivals
        try:
            yield delay
        finally:
            self.overlap += self.SMOOTHING * (float(self._arrivals > ticket) - self.overlap)


class Batcher:
    """The queue and worker threads of one model version."""

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        model: str,
        version: int,
        max_batch_size: int = 64,
        max_queue_delay: float = 0.002,
        max_batch_tokens: int = 16384,
        max_score_tokens: int = 256,
        queue_capacity: int = 1024,
        timeout: float = 10.0,
        retry_after: float = 1.0,
        workers: int = 1,
    ) -> None:
        self.runtime = runtime
        self.model = model
        self.version = version
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_batch_tokens = max_batch_tokens
        # The score graph materialises [rows, time, vocabulary] log-probs: its batches get a far
        # smaller padded-token budget than predict's (which keeps only the last position).
        self.max_score_tokens = max_score_tokens
        self.queue_capacity = queue_capacity
        self.timeout = timeout
        self.retry_after = retry_after
        if workers < 1:
            raise ValueError("a batcher needs at least one worker")
        self.workers = workers
        self.pace = Pace()  # for callers that let their items wait for companions under load
        card = runtime.card
        self.state_names: list[str] = list(card.state_names)
        self.state_shape = (card.num_layers, card.hidden_size)
        self._queue: deque[WorkItem] = deque()
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        # One condition per worker on the same lock: a submission wakes the lowest-numbered idle
        # worker, and worker i takes work only while workers 0..i-1 are all busy. So a lone
        # request always runs on worker 0, whose caches are warm, rather than on whichever
        # worker happens to have waited longest (with plain FIFO wake-ups, 2 workers made a
        # 2-item session update 0.1-0.6 ms slower than 1 worker did).
        self._wake = [self._cond] + [threading.Condition(lock) for _ in range(workers - 1)]
        self._busy = [False] * workers
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._depth = metrics.QUEUE_DEPTH.labels(model)
        self._wait = metrics.QUEUE_WAIT.labels(model)
        self._batch_size = metrics.BATCH_SIZE.labels(model)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Batcher:
        if not self._threads:
            self._threads = [
                threading.Thread(
                    target=self._loop, args=(i,), name=f"batcher-{self.model}-{self.version}-{i}", daemon=True
                )
                for i in range(self.workers)
            ]
            for thread in self._threads:
                thread.start()
        return self

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work. With ``drain`` the queued items still run (a version swapped out
        during traffic finishes what it accepted); otherwise they fail with BatcherClosedError."""
        with self._cond:
            self._closed = True
            dropped: list[WorkItem] = []
            if not drain:
                dropped = list(self._queue)
                self._queue.clear()
                self._depth.dec(len(dropped))
            for wake in self._wake:
                wake.notify_all()
        for item in dropped:
            _fail(item, BatcherClosedError())
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def depth(self) -> int:
        return len(self._queue)

    # --- submission ---------------------------------------------------------------------------

    def _check(self, item: WorkItem) -> None:
        if item.tokens.size < 1:
            raise ValueError("a work item needs at least one token")
        if item.graph not in (PREDICT, SCORE):
            raise ValueError(f"unknown graph {item.graph!r}")
        if item.graph == SCORE and (item.targets is None or item.targets.shape != item.tokens.shape):
            raise ValueError("a score item needs targets as long as its tokens")
        if item.state is not None:
            for name in self.state_names:
                row = item.state.get(name)
                if row is None or tuple(row.shape) != self.state_shape:
                    raise ValueError(f"state {name!r} must be an array of shape {list(self.state_shape)}")

    def submit_many(self, items: Sequence[WorkItem], timeout: float | None = None) -> list[concurrent.futures.Future]:
        """Queue items (all or none) and return their futures; never blocks.

        Raises :class:`QueueFullError` when they do not all fit, :class:`BatcherClosedError` after
        ``close()``, ``ValueError`` for a malformed item."""
        for item in items:
            self._check(item)
        timeout = self.timeout if timeout is None else timeout
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise BatcherClosedError()
            if len(self._queue) + len(items) > self.queue_capacity:
                raise QueueFullError(self.queue_capacity, self.retry_after)
            for item in items:
                item.enqueued_at = now
                item.deadline = now + timeout
                self._queue.append(item)
            self._depth.inc(len(items))
            self._notify_idle()
        return [item.future for item in items]

    def submit(self, item: WorkItem, timeout: float | None = None) -> concurrent.futures.Future[WorkResult]:
        return self.submit_many([item], timeout)[0]

    async def run(self, item: WorkItem, timeout: float | None = None) -> WorkResult:
        """Submit one item and await its result without blocking the event loop."""
        return (await self.run_many([item], timeout))[0]

    async def run_many(self, items: Sequence[WorkItem], timeout: float | None = None) -> list[WorkResult]:
        """Submit items atomically and await all results (they may land in different batches).

        Cancelling the awaiting task (client gone) cancels the items still queued."""
        timeout = self.timeout if timeout is None else timeout
        futures = self.submit_many(items, timeout)
        waiting = [asyncio.wrap_future(f) for f in futures]
        try:
            # A little slack over the queue deadline: the worker's own expiry check answers first
            # for queued items; this bound catches an item stuck in a slow batch.
            return list(await asyncio.wait_for(asyncio.gather(*waiting), timeout + 0.05))
        except TimeoutError:
            raise DeadlineExceededError(timeout) from None
        finally:
            for w in waiting:
                if not w.done():
                    w.cancel()

    # --- worker -------------------------------------------------------------------------------

    def _notify_idle(self) -> None:
        """Wake the lowest-numbered idle worker (called with the lock held)."""
        for index, busy in enumerate(self._busy):
            if not busy:
                self._wake[index].notify()
                return

    def _loop(self, index: int = 0) -> None:
        wake = self._wake[index]
        while True:
            with self._cond:
                # Worker i > 0 helps only while every lower-numbered worker is busy.
                while not self._closed and not (self._queue and all(self._busy[:index])):
                    wake.wait()
                if not self._queue:
                    return  # closed and drained
                if not self._closed:
                    # Give the queued items' companions until the earliest of their flush times
                    # (recomputed on every wake: an item that may not wait can arrive meanwhile).
                    while self._queue and len(self._queue) < self.max_batch_size and not self._closed:
                        remaining = self._flush_at() - time.monotonic()
                        if remaining <= 0:
                            break
                        wake.wait(remaining)
                batch, dead = self._take()
                # Alone with nothing queued: this batch may use every core. Otherwise the other
                # workers' batches share them (ModelRuntime.run's narrower sessions); so do the
                # batches of keyboard load (session steps waiting for companions), many small
                # ones a second: a step batch spends 44% more CPU on two threads than on one
                # (3.2 against 2.2 ms at 12 rows) to finish 0.4 ms sooner, and the event loop
                # answering the keystrokes needs that core.
                shared = any(self._busy) or bool(self._queue) or self.pace.waiting
                if batch:
                    self._busy[index] = True
                    if self._queue:
                        self._notify_idle()  # what did not fit this batch goes to the next worker
            for item, exc in dead:
                _fail(item, exc)
            if batch:
                try:
                    self._execute(batch, shared)
                except Exception as exc:  # never let one bad batch kill the worker
                    log.exception("inference failed for %s v%s (%d rows)", self.model, self.version, len(batch))
                    error = exc if isinstance(exc, EngineError) else EngineError(f"inference failed: {exc}")
                    for item in batch:
                        _fail(item, error)
                finally:
                    with self._cond:
                        self._busy[index] = False

    def _flush_at(self) -> float:
        """When the queue's batch must start: the earliest item's arrival plus its delay (called
        with the lock held)."""
        default = self.max_queue_delay
        return min(it.enqueued_at + (default if it.max_delay is None else it.max_delay) for it in self._queue)

    def _take(self) -> tuple[list[WorkItem], list[tuple[WorkItem, Exception]]]:
        """Pop the next batch (called with the lock held): live items of the head's graph, in
        arrival order, within the row and padded-token budgets. Cancelled items are dropped and
        expired ones returned for failing."""
        now = time.monotonic()
        taken: list[WorkItem] = []
        dead: list[tuple[WorkItem, Exception]] = []
        kept: deque[WorkItem] = deque()
        graph: str | None = None
        budget = self.max_batch_tokens
        longest = 0
        removed = 0
        while self._queue:
            if len(taken) >= self.max_batch_size:
                kept.extend(self._queue)
                self._queue.clear()
                break
            item = self._queue.popleft()
            if item.future.cancelled():
                removed += 1
                continue
            if item.deadline is not None and now > item.deadline:
                removed += 1
                dead.append((item, DeadlineExceededError(item.deadline - item.enqueued_at)))
                continue
            if graph is None:
                graph = item.graph
                budget = self.max_score_tokens if graph == SCORE else self.max_batch_tokens
            if item.graph == graph:
                n = max(longest, item.tokens.size)
                # The first item always goes, however long: nothing may starve.
                if not taken or (len(taken) + 1) * n <= budget:
                    if item.future.set_running_or_notify_cancel():
                        taken.append(item)
                        longest = n
                    removed += 1
                    continue
            kept.append(item)
        self._queue = kept
        if removed:
            self._depth.dec(removed)
        return taken, dead

    def _execute(self, batch: list[WorkItem], shared: bool = False) -> None:
        start = time.monotonic()
        graph = batch[0].graph
        rows = len(batch)
        lengths = np.fromiter((it.tokens.size for it in batch), dtype=np.int64, count=rows)
        width = int(lengths.max())
        tokens = np.zeros((rows, width), dtype=np.int64)  # padding id 0: never read (lengths)
        for i, item in enumerate(batch):
            tokens[i, : item.tokens.size] = item.tokens
        feeds: dict[str, np.ndarray] = {A.TOKENS: tokens, A.LENGTHS: lengths}
        if graph == SCORE:
            targets = np.zeros((rows, width), dtype=np.int64)
            for i, item in enumerate(batch):
                targets[i, : item.targets.size] = item.targets
            feeds[A.TARGETS] = targets
        layers, hidden = self.state_shape
        for name in self.state_names:
            state = np.zeros((layers, rows, hidden), dtype=np.float32)
            for i, item in enumerate(batch):
                if item.state is not None:
                    state[:, i, :] = item.state[name]
            feeds[A.state_input(name)] = state

        want_state = any(it.want_state for it in batch)
        if graph == PREDICT:
            main = [A.LOG_PROBS] if any(it.want_log_probs for it in batch) or not want_state else []
        else:
            main = [A.TARGET_LOG_PROBS, A.TARGET_RANKS]
        state_outputs = [A.state_output(n) for n in self.state_names] if want_state else []
        outputs, elapsed = self.runtime.run(graph, feeds, main + state_outputs, shared)
        named = dict(zip(main + state_outputs, outputs, strict=True))

        labels = {it.metric_label for it in batch}
        label = labels.pop() if len(labels) == 1 else graph
        metrics.INFERENCE_DURATION.labels(self.model, str(self.version), label).observe(elapsed)
        self._batch_size.observe(rows)
        token_counts: dict[str, int] = {}
        for item in batch:
            token_counts[item.metric_label] = token_counts.get(item.metric_label, 0) + item.tokens.size
        for name, count in token_counts.items():
            metrics.TOKENS.labels(self.model, name).inc(count)

        log_probs = named.get(A.LOG_PROBS)
        if log_probs is not None:
            log_probs.flags.writeable = False  # rows are shared views: keep callers honest
        for i, item in enumerate(batch):
            wait = start - item.enqueued_at
            self._wait.observe(wait)
            result = WorkResult(queue_wait=wait, batch_size=rows)
            n = item.tokens.size
            if graph == PREDICT and item.want_log_probs and log_probs is not None:
                result.log_probs = log_probs[i]
            if graph == SCORE:
                result.target_log_probs = named[A.TARGET_LOG_PROBS][i, :n].copy()
                result.target_ranks = named[A.TARGET_RANKS][i, :n].copy()
            if item.want_state:
                result.next_state = {n_: named[A.state_output(n_)][:, i, :].copy() for n_ in self.state_names}
            _resolve(item, result)


def _resolve(item: WorkItem, result: WorkResult) -> None:
    # Cancelled meanwhile (client gone): nobody is waiting.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        item.future.set_result(result)


def _fail(item: WorkItem, exc: Exception) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        item.future.set_exception(exc)
