"""Next-word prediction, prefix completion and scoring on top of the repository and batcher.

Keyboard semantics (``nextword.text.split_text``): when the text ends inside a word, that
fragment is a *prefix* to complete: every offered word starts with it and the probabilities are
renormalised over the matching words. Otherwise the next whole word is predicted. ``<unk>`` and
``<eos>`` are never offered.

Stateless model input: ``[<eos>] + the last N context words`` (N = ``NEXTWORD_CONTEXT_WORDS``,
the context budget; the result says ``truncated`` when words were dropped) from the zero state.
Scoring reads the whole text (bounded by ``NEXTWORD_MAX_SCORE_WORDS``): tokens
``[<eos>, w1..w(n-1)]`` against targets ``[w1..wn]`` through the score graph, in chunks that carry
the recurrent state (:func:`score_tokens`).

Inference goes through the version's batcher; top-k and prefix selection run afterwards on the
returned row with numpy (:class:`~service.engine.vocab_index.VocabIndex`), outside any lock.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from nextword.text import SplitText, split_text, tokenize
from service.config import Settings
from service.engine.batcher import PREDICT, SCORE, WorkItem
from service.engine.cache_lm import AdaptedRow, adapt, first_use_rule
from service.engine.errors import (
    DeadlineExceededError,
    InvalidInputError,
    TextTooLongError,
    TooManyWordsError,
)
from service.engine.repository import LoadedVersion, ModelRepository
from service.engine.suggest import DEFAULT_OPTIONS, Candidate, SuggestOptions, Writing, select
from service.engine.swap import on_current_version

T = TypeVar("T")


@dataclass
class Prediction:
    model: str
    version: int
    candidates: list[Candidate]
    prefix: str
    context_words: int  # words the model read (after the context budget), <eos> start excluded
    truncated: bool  # True when the context budget dropped earlier words
    prefix_probability: float  # model probability of all eligible words matching the prefix
    matches: int  # eligible words matching the prefix


@dataclass
class WordScore:
    word: str
    id: int
    log_prob: float
    rank: int
    oov: bool


@dataclass
class ScoreResult:
    model: str
    version: int
    words: list[WordScore] = field(default_factory=list)
    total_log_prob: float = 0.0
    perplexity: float = 0.0


@dataclass(frozen=True)
class PredictQuery:
    text: str
    k: int = 5
    model: str | None = None
    version: int | None = None
    learn: bool = True  # False: no adaptation to the text (its cache and new words are ignored)
    options: SuggestOptions = DEFAULT_OPTIONS


def encode_context(version: LoadedVersion, words: Sequence[str], budget: int) -> tuple[np.ndarray, int, bool]:
    """Model input for a fresh context: ``[<eos>] + ids of the last ``budget`` words``.

    Returns the ids, how many words were kept, and whether earlier words were dropped."""
    truncated = len(words) > budget
    kept = list(words[-budget:]) if truncated else list(words)
    ids = np.empty(len(kept) + 1, dtype=np.int64)
    ids[0] = version.eos_id
    ids[1:] = version.vocab.encode(kept)
    return ids, len(kept), truncated


def adapt_row(
    version: LoadedVersion, settings: Settings, log_probs: np.ndarray, words: Sequence[str],
    ids: Sequence[int] | np.ndarray, learn: bool = True,
) -> AdaptedRow:
    """The next-word distribution after ``words`` (the context the model read, ids ``ids``: those
    of the lowercase words, while ``words`` may be as written, which is how new words are offered): the
    model's row with the version's fitted cache over those words mixed in and the text's new words
    (``service/engine/cache_lm.py``), or the row as it is when the version has no cache, adaptation
    is off (``NEXTWORD_ADAPTATION``) or the request says ``learn: false``."""
    params = version.cache if learn and settings.adaptation and settings.cache_window_words > 0 else None
    if params is None:
        return AdaptedRow(log_probs)
    return adapt(log_probs, words, ids, params.limited(settings.cache_window_words), version.vocab.unk_id,
                 settings.new_word_min_count, first_use_rule(version.vocab, settings.new_word_first_use))


class Predictor:
    """Stateless next-word prediction and scoring for the HTTP layer (and any other front end)."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings

    async def with_version(
        self, model: str | None, version: int | None, fn: Callable[[LoadedVersion], Awaitable[T]]
    ) -> T:
        """Run ``fn`` on the resolved version, resolving again if a hot swap unloads it in between."""
        return await on_current_version(lambda: self.repository.resolve(model, version), fn)

    def check_text(self, text: str, field_name: str = "text") -> None:
        if len(text) > self.settings.max_text_chars:
            raise TextTooLongError(len(text), self.settings.max_text_chars, field_name)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # JSON can carry lone surrogates ("\ud800"); they cannot be words or be echoed back.
            raise InvalidInputError(f"text has an unpaired surrogate at character {exc.start}", field_name) from None

    # --- prediction ---------------------------------------------------------------------------

    async def predict(
        self, text: str, k: int = 5, model: str | None = None, version: int | None = None, learn: bool = True,
        options: SuggestOptions = DEFAULT_OPTIONS,
    ) -> Prediction:
        return (await self.predict_many([PredictQuery(text, k, model, version, learn, options)], item_field=None))[0]

    async def predict_many(self, queries: Sequence[PredictQuery], item_field: str | None = "items") -> list[Prediction]:
        """Predict for many texts; items for one version are submitted together (all or none
        queued), so a batch request fills batches instead of trickling in. ``item_field`` names
        the request list in errors (``items.3.text``); ``None`` for a single request."""
        for i, q in enumerate(queries):
            self.check_text(q.text, f"{item_field}.{i}.text" if item_field else "text")
        groups: dict[tuple[str | None, int | None], list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault((q.model, q.version), []).append(i)
        results: list[Prediction | None] = [None] * len(queries)

        async def run_group(key: tuple[str | None, int | None], indices: list[int]) -> None:
            async def on(version: LoadedVersion) -> None:
                prepared = []
                for i in indices:
                    split = split_text(queries[i].text)
                    ids, kept, truncated = encode_context(version, split.context, self.settings.context_words)
                    # The cache reads the text's last words even past the model's context budget
                    # (it is cheap), as a session remembers them.
                    words = split.context[-(self.settings.cache_window_words + 2) :]
                    prepared.append((i, split, kept, truncated, words, WorkItem(ids, PREDICT)))
                outputs = await version.batcher.run_many([p[-1] for p in prepared])
                for (i, split, kept, truncated, words, _), out in zip(prepared, outputs, strict=True):
                    assert out.log_probs is not None
                    q = queries[i]
                    ids = version.vocab.encode(words)
                    if q.learn and version.vocab.unk_id in ids:
                        # new words are offered as written: the same words with their case
                        committed, tail = split.written(q.text)
                        words = (committed + tail)[-len(words) :]
                    row = adapt_row(version, self.settings, out.log_probs, words, ids, q.learn)
                    results[i] = self._prediction(version, row, q, split, kept, truncated)

            await self.with_version(key[0], key[1], on)

        if len(groups) == 1:
            (key, indices), = groups.items()
            await run_group(key, indices)
        else:
            outcomes = await asyncio.gather(*(run_group(k, v) for k, v in groups.items()), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        return [r for r in results if r is not None]

    @staticmethod
    def _prediction(
        version: LoadedVersion, row: AdaptedRow, query: PredictQuery, split: SplitText, kept: int, truncated: bool
    ) -> Prediction:
        writing = Writing.of(query.text, split)
        candidates, top = select(version, row, query.k, split.prefix, writing, query.options)
        return Prediction(
            model=version.name, version=version.version, candidates=candidates, prefix=split.prefix,
            context_words=kept, truncated=truncated, prefix_probability=top.mass, matches=top.matches,
        )

    # --- scoring ------------------------------------------------------------------------------

    async def score(self, text: str, model: str | None = None, version: int | None = None) -> ScoreResult:
        self.check_text(text)
        words = tokenize(text)
        if not words:
            raise InvalidInputError("text contains no words to score", "text")
        if len(words) > self.settings.max_score_words:
            raise TooManyWordsError(len(words), self.settings.max_score_words)

        async def on(lv: LoadedVersion) -> ScoreResult:
            ids = np.asarray(lv.vocab.encode(words), dtype=np.int64)
            tokens = np.concatenate([[lv.eos_id], ids[:-1]]).astype(np.int64)
            lps, ranks = await score_tokens(lv, tokens, ids, self.settings.request_timeout_seconds)
            unk = lv.vocab.unk_id
            scored = [
                WordScore(word=w, id=int(i), log_prob=float(lp), rank=int(r), oov=bool(i == unk and w != "<unk>"))
                for w, i, lp, r in zip(words, ids, lps, ranks, strict=True)
            ]
            total = float(lps.sum())
            return ScoreResult(
                model=lv.name, version=lv.version, words=scored, total_log_prob=total,
                perplexity=_perplexity(total, len(words)),
            )

        return await self.with_version(model, version, on)


async def score_tokens(
    lv: LoadedVersion, tokens: np.ndarray, targets: np.ndarray, timeout: float
) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob (float64) and rank of ``targets[t]`` after ``tokens[:t+1]``, from the zero state.

    The score graph holds a [time, vocabulary] tensor per intermediate, so a long text runs as
    consecutive chunks of the batcher's ``max_score_tokens``, each starting from the state the
    previous one ended in: memory is bounded by the chunk, not the text (25,000 words in one
    call took 7.7 GB). ``timeout`` is the deadline of the whole text, not of each chunk."""
    chunk = lv.batcher.max_score_tokens
    deadline = time.monotonic() + timeout
    lps = np.empty(tokens.size, dtype=np.float64)
    ranks = np.empty(tokens.size, dtype=np.int64)
    state: dict[str, np.ndarray] | None = None
    for start in range(0, tokens.size, chunk):
        end = min(start + chunk, tokens.size)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(timeout)
        item = WorkItem(tokens[start:end], SCORE, state=state, targets=targets[start:end], want_state=end < tokens.size)
        out = await lv.batcher.run(item, remaining)
        assert out.target_log_probs is not None and out.target_ranks is not None
        lps[start:end] = out.target_log_probs
        ranks[start:end] = out.target_ranks
        state = out.next_state
    return lps, ranks


def _perplexity(total_log_prob: float, count: int) -> float:
    # exp overflows past ~709; no real model gets there, but a JSON body must never hold inf.
    return math.exp(min(-total_log_prob / count, 700.0))
