"""Multi-word generation (no HTTP): greedy, sampled (temperature / top-k / top-p, seeded) and beam
search completions, stepped word by word through the shared batcher.

Why it is built this way:

* **One work item per step.** A completion is a recurrent state plus the word it has just chosen.
  Each step submits ``WorkItem([word], state=state, want_state=True)`` and gets back the next-word
  log-probs and the state after that word. A step is one token, so steps of *different*
  generations (other requests, the ``n`` completions of one request, the beams of a beam search)
  coalesce in the version's :class:`~service.engine.batcher.Batcher` into one onnxruntime call,
  exactly like concurrent predictions do; nothing here holds a lock or a thread.
* **Same start as ``/v1/predict``.** The prompt is split with keyboard semantics
  (``nextword.text.split_text``) and encoded with :func:`~service.engine.predictor.encode_context`
  (``[<eos>] + the last NEXTWORD_CONTEXT_WORDS words``, zero state). When the prompt ends inside a
  word, the first generated word *completes that prefix* (it is chosen among the words starting
  with it, probabilities renormalised over them, as predict does) and contributes only its missing
  letters to the text. If no vocabulary word starts with the fragment, the fragment is read as a
  complete (out-of-vocabulary) word instead and generation continues after it.
* **Words, not sub-word tokens.** ``<unk>`` is never chosen; ``<eos>`` ends a completion
  (finish reason ``stop``); reaching ``max_words`` ends it with ``length``. Words are turned into
  text by :func:`join_piece` / :func:`detokenize` (no space before ``. , ; : ? ! ''`` and
  ``n't``-style words, Brown's ```` `` ```` → an opening ``"``, ...). A version with casing
  statistics writes each word in its usual form (the first one capitalised when the prompt ends a
  sentence); without them model words are lowercase and stay so. Blocklisted words are never
  chosen unless ``filter`` is off (:mod:`service.engine.blocklist`).
* **Stop strings** are matched on the completion text (never the prompt), as OpenAI does: the text
  is cut right before the earliest match and the completion ends with ``stop``. While streaming, a
  word is only released once no stop string can still begin inside it, so the streamed pieces
  always concatenate to the non-streamed text.
* **Reproducible sampling.** Completion ``i`` of a request draws from its own
  ``numpy.random.Generator`` seeded with ``(seed, i)``; candidates are ordered deterministically
  (probability, then id), so the same seed gives the same words whatever else the server is doing.
* **Bounded.** ``max_words`` ≤ ``NEXTWORD_MAX_GENERATION_WORDS``, ``n`` ≤ :data:`MAX_COMPLETIONS`,
  beam width ≤ :data:`MAX_BEAM_WIDTH`: one request can never occupy the batcher indefinitely.

Use::

    generator = Generator(engine.predictor)
    generation = await generator.start(prompt, GenerationParams(...), model, version)  # runs the prompt
    async for event in generation.events(): ...        # WordEvent / FinishEvent, or
    completions = await generation.run()               # everything at once

:meth:`Generator.start` does the validation and the prompt step, so a front end can still answer
an error status before it commits to a streaming response.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from nextword.text import EOS, split_text, tokenize
from service import metrics
from service.engine.batcher import STEP, WorkItem, WorkResult
from service.engine.errors import InvalidInputError
from service.engine.predictor import Predictor, encode_context
from service.engine.repository import LoadedVersion
from service.engine.truecase import TrueCase, render_word, starts_sentence

GREEDY = "greedy"
SAMPLE = "sample"
BEAM = "beam"
STRATEGIES = (GREEDY, SAMPLE, BEAM)

STOP = "stop"  # <eos> or a stop string ended the completion
LENGTH = "length"  # max_words reached

MAX_COMPLETIONS = 8  # n (and OpenAI's best_of) per prompt
MAX_BEAM_WIDTH = 8
MAX_TOP_LOGPROBS = 20  # alternatives reported per generated word
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 200

# --- detokenisation -------------------------------------------------------------------------------

# Words written against the previous word (closing marks, clitics).
_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", "''", "'", ")", "]", "}", "...", "%", "-rrb-", "-rsb-"}
_CLITIC = re.compile(r"(?:n't|'(?:s|re|ve|ll|d|m|t))$")
# Words the next word is written against (opening marks, currency).
_NO_SPACE_AFTER = {"``", "`", "(", "[", "{", "$", "#", "-lrb-", "-lsb-"}

# ``prev`` value meaning "after some prompt text that needs a separating space".
AFTER_TEXT = ""


def join_piece(prev: str | None, word: str, written: str | None = None) -> str:
    """The text that appends ``word`` after the word ``prev`` (``written``: how to write it, by
    default :func:`render_word`).

    ``prev`` is ``None`` at the start of a text (or after whitespace the prompt already has): no
    separating space. :data:`AFTER_TEXT` stands for "after prompt text": a space unless ``word``
    attaches to the left."""
    text = render_word(word) if written is None else written
    if prev is None or word in _NO_SPACE_BEFORE or _CLITIC.fullmatch(word) or prev in _NO_SPACE_AFTER:
        return text
    return " " + text


def detokenize(words: Sequence[str]) -> str:
    """Words (as the model knows them) joined into text; ``<eos>`` marks are dropped."""
    out: list[str] = []
    prev: str | None = None
    for word in words:
        if word == EOS:
            continue
        out.append(join_piece(prev, word))
        prev = word
    return "".join(out)


# --- parameters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    """How to generate. Front ends translate their protocol into this.

    ``strategy``: ``greedy`` (argmax each step), ``sample`` (temperature, then top-k, then top-p;
    ``temperature == 0`` means greedy) or ``beam`` (``beam_width`` hypotheses ranked by
    ``sum log p / length ** length_penalty``; the best ``n`` are returned). ``logprobs``: how many
    top alternatives to report per generated word (0: none; the chosen word's log-prob is always
    reported). ``frequency_penalty`` / ``presence_penalty`` (OpenAI's definitions, on words this
    completion generated) apply to greedy and sampled choices, not to beam search."""

    max_words: int = 16
    strategy: str = GREEDY
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    beam_width: int = 4
    length_penalty: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    filter: bool = True  # never choose (or list as alternatives) blocklisted words

    def validate(self, max_words_limit: int) -> None:
        """Raise :class:`InvalidInputError` (with the offending field) for anything out of bounds."""

        def bad(message: str, name: str) -> InvalidInputError:
            return InvalidInputError(message, name)

        if self.strategy not in STRATEGIES:
            raise bad(f"strategy must be one of {', '.join(STRATEGIES)}", "strategy")
        if not 0 <= self.max_words <= max_words_limit:
            raise bad(
                f"max_words must be between 0 and {max_words_limit} (NEXTWORD_MAX_GENERATION_WORDS)", "max_words"
            )
        if not 1 <= self.n <= MAX_COMPLETIONS:
            raise bad(f"n must be between 1 and {MAX_COMPLETIONS}", "n")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature must be a finite number >= 0", "temperature")
        if not 0 <= self.top_p <= 1:
            raise bad("top_p must be between 0 and 1", "top_p")
        if self.top_k < 0:
            raise bad("top_k must be >= 0 (0 = no top-k cut)", "top_k")
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise bad(f"beam_width must be between 1 and {MAX_BEAM_WIDTH}", "beam_width")
        if self.strategy == BEAM and self.n > self.beam_width:
            raise bad(f"n ({self.n}) cannot exceed beam_width ({self.beam_width})", "n")
        if not (math.isfinite(self.length_penalty) and self.length_penalty >= 0):
            raise bad("length_penalty must be a finite number >= 0", "length_penalty")
        if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise bad(f"{name} must be a finite number", name)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise bad(f"stop strings must have 1 to {MAX_STOP_CHARS} characters", "stop")

    @property
    def deterministic(self) -> bool:
        return self.strategy != SAMPLE or self.temperature == 0


# --- results and events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Alternative:
    """One of the most likely words at a step (``text``: how it would have been written)."""

    word: str
    text: str
    log_prob: float


@dataclass(frozen=True)
class GeneratedWord:
    """A chosen word. ``text`` is what it adds to the completion (leading space included; only the
    missing letters when it completes the prompt's last word; cut short by a stop string).
    ``offset`` is where ``text`` starts in the completion. ``log_prob`` is the model's (before
    temperature/penalties; renormalised over the prefix matches when completing a prefix)."""

    word: str
    id: int
    text: str
    offset: int
    log_prob: float
    top: tuple[Alternative, ...] | None = None


@dataclass(frozen=True)
class CompletionResult:
    index: int
    text: str
    words: tuple[GeneratedWord, ...]
    finish_reason: str
    log_prob: float  # sum over the words
    score: float  # sum of every model choice, the closing <eos> included (used for ranking)
    steps: int  # model choices made (words + the closing <eos>)

    @property
    def mean_log_prob(self) -> float:
        return self.score / max(1, self.steps)


@dataclass(frozen=True)
class WordEvent:
    index: int
    word: GeneratedWord


@dataclass(frozen=True)
class FinishEvent:
    index: int
    completion: CompletionResult


Event = WordEvent | FinishEvent


# --- the prompt -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptPlan:
    """What the model reads and how the first word attaches to the prompt text.

    ``prefix``: the fragment the first word completes ('' for none); ``shout``: it was typed in
    capitals (at least two letters, e.g. ``U.S``), so the completing letters are capitals too.
    ``prev``: the word the first
    piece joins to (``None``: no leading space, e.g. empty prompt or one ending in whitespace;
    :data:`AFTER_TEXT`: after text that did not tokenize into a word)."""

    ids: np.ndarray
    words: list[str]
    context_words: int
    truncated: bool
    prefix: str
    prev: str | None
    shout: bool = False
    sentence_start: bool = False  # the first word starts a sentence (written with a capital)


def plan_prompt(version: LoadedVersion, prompt: str, budget: int, filtered: bool = True) -> PromptPlan:
    split = split_text(prompt)
    context, prefix = split.context, split.prefix
    if prefix and version.index.candidates(prefix, filtered).size == 0:
        # Nothing completes the fragment: treat it as a whole (unknown) word and go on after it.
        context, prefix = tokenize(prompt), ""
    ids, kept, truncated = encode_context(version, context, budget)
    if prefix or not prompt or prompt[-1].isspace():
        prev = None
    else:
        prev = context[-1] if context else AFTER_TEXT
    typed = prompt[len(prompt) - len(prefix):] if prefix else ""
    shout = typed.isupper() and sum(ch.isalpha() for ch in typed) >= 2
    return PromptPlan(ids, list(context[len(context) - kept:]), kept, truncated, prefix, prev, shout,
                      starts_sentence(context))


# --- per-completion bookkeeping -------------------------------------------------------------------


class _Draft:
    """A completion being built: words, text, stop-string cut and what may already be streamed."""

    __slots__ = ("words", "text", "prev", "prefix", "shout", "score", "steps", "finish_reason", "released", "counts",
                 "casing", "sentence_start")

    def __init__(self, prev: str | None, prefix: str, shout: bool = False, casing: TrueCase | None = None,
                 sentence_start: bool = False) -> None:
        self.words: list[GeneratedWord] = []
        self.text = ""
        self.prev = prev
        self.prefix = prefix  # only for the first word
        self.shout = shout
        self.casing = casing  # None: words are written as the model words
        self.sentence_start = sentence_start  # only for the first word
        self.score = 0.0
        self.steps = 0
        self.finish_reason: str | None = None
        self.released = 0
        self.counts: dict[int, int] = {}

    def copy(self) -> _Draft:
        other = _Draft(self.prev, self.prefix, self.shout, self.casing, self.sentence_start)
        other.words = list(self.words)
        other.text = self.text
        other.score = self.score
        other.steps = self.steps
        other.counts = dict(self.counts)
        return other

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def step_prefix(self) -> str:
        return self.prefix if not self.words else ""

    def piece(self, word: str, word_id: int) -> str:
        first = not self.words
        if self.casing is None:
            written = render_word(word)
        else:
            written = self.casing.display(word_id, first and self.sentence_start and not self.prefix)
        if first and self.prefix:
            rest = written[len(self.prefix):] if word.startswith(self.prefix) else written
            return rest.upper() if self.shout else rest
        return join_piece(self.prev, word, written)

    def add(self, word: str, word_id: int, log_prob: float, top: tuple[Alternative, ...] | None,
            stops: Sequence[str]) -> bool:
        """Append a chosen word; returns True when a stop string now ends the completion."""
        piece = self.piece(word, word_id)
        start = len(self.text)
        self.words.append(GeneratedWord(word, word_id, piece, start, log_prob, top))
        self.text += piece
        self.prev = word
        self.score += log_prob
        self.steps += 1
        self.counts[word_id] = self.counts.get(word_id, 0) + 1
        if not stops:
            return False
        longest = max(len(s) for s in stops)
        lo = max(0, start - longest + 1)  # no match ended before this word: only new ones count
        hits = [i for i in (self.text.find(s, lo) for s in stops) if i >= 0]
        if not hits:
            return False
        self._cut(min(hits))
        self.finish_reason = STOP
        return True

    def _cut(self, pos: int) -> None:
        """Keep the text before ``pos``: words starting at or after it go, the last one is clipped."""
        kept = [w for w in self.words if w.offset < pos]
        if kept and kept[-1].offset + len(kept[-1].text) > pos:
            last = kept[-1]
            kept[-1] = replace(last, text=last.text[: pos - last.offset])
        self.words = kept
        self.text = self.text[:pos]

    def end(self, reason: str, eos_log_prob: float | None = None) -> None:
        if eos_log_prob is not None:
            self.score += eos_log_prob
            self.steps += 1
        self.finish_reason = reason

    def releasable(self, stops: Sequence[str]) -> list[GeneratedWord]:
        """Words that may be streamed now: all of them once finished, else those that end before
        any text a stop string could still start in (held back until the next word decides)."""
        limit = len(self.text)
        if not self.done and stops:
            held = 0
            for s in stops:
                for k in range(min(len(s) - 1, len(self.text)), held, -1):
                    if self.text.endswith(s[:k]):
                        held = k
                        break
            limit -= held
        out = []
        while self.released < len(self.words):
            w = self.words[self.released]
            if not self.done and w.offset + len(w.text) > limit:
                break
            out.append(w)
            self.released += 1
        return out

    def result(self, index: int) -> CompletionResult:
        return CompletionResult(
            index=index, text=self.text, words=tuple(self.words), finish_reason=self.finish_reason or LENGTH,
            log_prob=float(sum(w.log_prob for w in self.words)), score=self.score, steps=self.steps,
        )


# --- choosing words -------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray) -> float:
    top = float(x.max())
    if not math.isfinite(top):
        return top
    return top + float(np.log(np.exp(x - top).sum()))


def step_scores(version: LoadedVersion, row: np.ndarray, prefix: str = "", filtered: bool = True) -> np.ndarray:
    """Log-probs of the next choice as float64: ``<unk>`` (and, ``filtered``, every blocklisted
    word) impossible; with a ``prefix``, only the words starting with it (renormalised over them,
    ``<eos>`` excluded). Without a prefix the rest keep the model's probabilities."""
    if prefix:
        ids = version.index.candidates(prefix, filtered)
        scores = np.full(row.shape[0], -np.inf)
        sub = row[ids].astype(np.float64)
        scores[ids] = sub - _logsumexp(sub)
        return scores
    scores = row.astype(np.float64)  # a copy: batch rows are read-only
    scores[version.vocab.unk_id] = -np.inf
    if filtered:
        scores[version.index.blocked] = -np.inf
    return scores


def choose(scores: np.ndarray, params: GenerationParams, rng: np.random.Generator | None,
           counts: dict[int, int] | None = None) -> int:
    """The next word id (or -1 when nothing is possible) for greedy or sampled generation.

    Order as in common practice: penalties, temperature, top-k, top-p, then one draw. Candidate
    order is by probability then id, so a seeded draw depends on nothing but the scores."""
    logits = scores
    if counts and (params.frequency_penalty or params.presence_penalty):
        logits = scores.copy()
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        seen = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        logits[ids] -= seen * params.frequency_penalty + params.presence_penalty
    best = int(np.argmax(logits))  # ties: lowest id, like predict's top-k
    if not math.isfinite(float(logits[best])):
        return -1
    if params.deterministic or rng is None:
        return best
    ids = np.flatnonzero(np.isfinite(logits))
    values = logits[ids] / params.temperature
    if 0 < params.top_k < ids.size:
        part = np.argpartition(-values, params.top_k - 1)[: params.top_k]
        ids, values = ids[part], values[part]
    if params.top_p < 1.0 or params.top_k:
        order = np.lexsort((ids, -values))
        ids, values = ids[order], values[order]
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = min(int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1, probs.size)
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    cumulative = np.cumsum(probs)
    at = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(ids[min(at, ids.size - 1)])


def _rng(seed: int | None, index: int) -> np.random.Generator:
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, index])


# --- one generation -------------------------------------------------------------------------------


@dataclass
class _Hyp:
    """A live hypothesis: its draft, the state before its pending word, and that word."""

    draft: _Draft
    state: dict[str, np.ndarray] | None = None
    pending: int = -1
    row: np.ndarray | None = None  # next-word log-probs once the pending word has been fed


class Generation:
    """The completions of one prompt; created by :meth:`Generator.start` (prompt already run)."""

    def __init__(self, version: LoadedVersion, plan: PromptPlan, params: GenerationParams,
                 first: WorkResult | None, started: float) -> None:
        self.version = version
        self.plan = plan
        self.params = params
        self._first = first
        self.started = started
        self.completions: list[CompletionResult] = []
        self._consumed = False

    @property
    def model(self) -> str:
        return self.version.name

    @property
    def model_version(self) -> int:
        return self.version.version

    async def run(self) -> list[CompletionResult]:
        """Generate everything; the completions in index order."""
        async for _ in self.events():
            pass
        return self.completions

    async def events(self) -> AsyncIterator[Event]:
        """Word events as words become final and one finish event per completion (streaming
        order: by step, then by completion index). Records the generation metrics."""
        if self._consumed:
            raise RuntimeError("a generation's events can be read once")
        self._consumed = True
        name = self.version.name
        first_word = True
        steps = self._beam() if self.params.strategy == BEAM else self._sample()
        async with contextlib.aclosing(steps):
            async for batch in steps:
                for event in batch:
                    if isinstance(event, WordEvent):
                        metrics.GENERATED_WORDS.labels(name).inc()
                        if first_word:
                            metrics.GENERATION_TTFW.labels(name).observe(time.monotonic() - self.started)
                            first_word = False
                    else:
                        self.completions.append(event.completion)
                    yield event
        self.completions.sort(key=lambda c: c.index)
        metrics.GENERATION_DURATION.labels(name).observe(time.monotonic() - self.started)

    # --- shared ----------------------------------------------------------------------------------

    def _top(self, row: np.ndarray, draft: _Draft) -> tuple[Alternative, ...] | None:
        if not self.params.logprobs:
            return None
        prefix = draft.step_prefix
        top = self.version.index.top_k(row, self.params.logprobs, prefix, filtered=self.params.filter)
        words = self.version.index.decode(top.ids)
        return tuple(Alternative(w, draft.piece(w, int(i)), float(lp))
                     for w, i, lp in zip(words, top.ids, top.log_probs, strict=True))

    async def _advance(self, hyps: list[_Hyp]) -> None:
        """Feed every hypothesis its pending word, in one submission (they share batches)."""
        items = [WorkItem(np.array([h.pending]), state=h.state, want_state=True, label=STEP) for h in hyps]
        results = await self.version.batcher.run_many(items)
        for h, r in zip(hyps, results, strict=True):
            h.state, h.row = r.next_state, r.log_probs

    def _draft(self) -> _Draft:
        plan = self.plan
        return _Draft(plan.prev, plan.prefix, plan.shout, self.version.casing, plan.sentence_start)

    def _first_hyp(self, draft: _Draft) -> _Hyp:
        assert self._first is not None
        return _Hyp(draft, state=self._first.next_state, row=self._first.log_probs)

    # --- greedy / sampling ----------------------------------------------------------------------

    async def _sample(self) -> AsyncIterator[list[Event]]:
        p = self.params
        stops = p.stop
        drafts = [self._draft() for _ in range(p.n)]
        if p.max_words == 0 or self._first is None:
            for d in drafts:
                d.end(LENGTH)
            yield [FinishEvent(i, d.result(i)) for i, d in enumerate(drafts)]
            return
        rngs = [None if p.deterministic else _rng(p.seed, i) for i in range(p.n)]
        live = [(i, self._first_hyp(d)) for i, d in enumerate(drafts)]
        eos = self.version.eos_id
        while live:
            events: list[Event] = []
            still: list[tuple[int, _Hyp]] = []
            for i, h in live:
                d = h.draft
                assert h.row is not None
                scores = step_scores(self.version, h.row, d.step_prefix, p.filter)
                choice = choose(scores, p, rngs[i], d.counts)
                if choice < 0 or choice == eos:
                    d.end(STOP, float(scores[choice]) if choice >= 0 else None)
                else:
                    word = self.version.vocab.itos[choice]
                    if not d.add(word, choice, float(scores[choice]), self._top(h.row, d), stops) and (
                        len(d.words) >= p.max_words
                    ):
                        d.end(LENGTH)
                events.extend(WordEvent(i, w) for w in d.releasable(stops))
                if d.done:
                    events.append(FinishEvent(i, d.result(i)))
                else:
                    h.pending = choice
                    still.append((i, h))
            yield events
            live = still
            if live:
                await self._advance([h for _, h in live])

    # --- beam search ----------------------------------------------------------------------------

    async def _beam(self) -> AsyncIterator[list[Event]]:
        p = self.params
        width, stops, eos = p.beam_width, p.stop, self.version.eos_id
        root = self._draft()
        finished: list[_Draft] = []
        if p.max_words == 0 or self._first is None:
            root.end(LENGTH)
            finished.append(root)
            hyps: list[_Hyp] = []
        else:
            hyps = [self._first_hyp(root)]

        def norm(d: _Draft) -> float:
            return d.score / max(1, d.steps) ** p.length_penalty

        while hyps:
            candidates: list[tuple[float, int, int, float]] = []
            for hi, h in enumerate(hyps):
                assert h.row is not None
                scores = step_scores(self.version, h.row, h.draft.step_prefix, p.filter)
                finite = np.flatnonzero(np.isfinite(scores))
                take = min(2 * width, finite.size)
                if take == 0:
                    continue
                best = finite[np.argpartition(-scores[finite], take - 1)[:take]]
                candidates.extend((h.draft.score + float(scores[w]), hi, int(w), float(scores[w])) for w in best)
            candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
            survivors: list[_Hyp] = []
            tops: dict[int, tuple[Alternative, ...] | None] = {}
            for _total, hi, word_id, lp in candidates:
                parent = hyps[hi]
                child = parent.draft.copy()
                if word_id == eos:
                    child.end(STOP, lp)
                    finished.append(child)
                    continue
                if hi not in tops:
                    assert parent.row is not None
                    tops[hi] = self._top(parent.row, parent.draft)
                word = self.version.vocab.itos[word_id]
                if child.add(word, word_id, lp, tops[hi], stops):
                    finished.append(child)
                elif len(child.words) >= p.max_words:
                    child.end(LENGTH)
                    finished.append(child)
                else:
                    survivors.append(_Hyp(child, state=parent.state, pending=word_id))
                    if len(survivors) == width:
                        break
            if not survivors:
                break
            if len(finished) >= width:
                worst_kept = sorted((norm(d) for d in finished), reverse=True)[width - 1]
                if max(norm(h.draft) for h in survivors) <= worst_kept:
                    break
            await self._advance(survivors)
            hyps = survivors
        if not finished:  # nothing could follow the prompt at all (a vocabulary of specials only)
            root.end(STOP)
            finished.append(root)
        # Every hypothesis ends in `finished` (eos, stop string or max_words) before the loop
        # stops, except when the early-stopping rule already has `width` better ones.
        ranked = sorted(enumerate(finished), key=lambda e: (-norm(e[1]), e[0]))[: p.n]
        events: list[Event] = []
        for i, (_, d) in enumerate(ranked):
            events.extend(WordEvent(i, w) for w in d.releasable(stops))
            events.append(FinishEvent(i, d.result(i)))
        yield events


class Generator:
    """Starts generations on the repository's versions (stateless; cheap to create per request)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.settings = predictor.settings

    async def start(self, prompt: str, params: GenerationParams, model: str | None = None,
                    version: int | None = None, prompt_field: str = "prompt") -> Generation:
        """Validate, resolve the version and run the prompt (so errors surface before any word).

        A version swapped out before the prompt ran is re-resolved (as predict does); once words
        are being generated the completion stays on its version, whose state it carries."""
        started = time.monotonic()
        self.predictor.check_text(prompt, prompt_field)
        params.validate(self.settings.max_generation_words)

        async def on(lv: LoadedVersion) -> Generation:
            plan = plan_prompt(lv, prompt, self.settings.context_words, params.filter)
            first = None
            if params.max_words > 0:
                first = await lv.batcher.run(WorkItem(plan.ids, state=None, want_state=True, label=STEP))
            return Generation(lv, plan, params, first, started)

        return await self.predictor.with_version(model, version, on)
