"""From one next-word row to the suggestions a keyboard shows: top-k (with prefix completion), the
blocklist, typo corrections and the written form of each word.

Everything here works on a given log-prob row and the text's keyboard split, whatever computed the
row (a stateless read, a session's step, a cached distribution), and none of it runs the model.

Probabilities: without corrections in the answer they are exactly as before (renormalised over
the eligible words matching the prefix). When corrections enter the top ``k`` every suggestion's
probability is the posterior over what the fragment may stand for, P(w | context, fragment) ∝
P_model(w | context) · P(fragment | w) over the prefix matches (no error) and all correction
candidates (one error; see :mod:`service.engine.correct`).

The row may be an adapted one (:class:`~service.engine.cache_lm.AdaptedRow`: the cache language
model mixed in, and the text's new words beside the vocabulary). New words take part in the top
``k`` and the blocklist like vocabulary words; they are never corrections, and having no casing
statistics they are written as the writer last wrote them ("Ierulli"; capitalised at a sentence
start or after a capitalised fragment, all capitals after a fragment in capitals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from service.engine.cache_lm import AdaptedRow, Selection, select_words
from service.engine.correct import LOG_NO_ERROR, MAX_ERROR_LOG_PROB, NO_BAR, Bar
from service.engine.truecase import AS_IS, apply_case, case_of, starts_sentence, typed_fragment

if TYPE_CHECKING:
    from nextword.text import SplitText
    from service.engine.repository import LoadedVersion


@dataclass(slots=True)
class Candidate:
    """One suggestion. Not frozen: several are built per keystroke, and a frozen dataclass sets
    each field through ``object.__setattr__``; nothing changes one after it is built."""

    word: str  # the model word (lowercase), or a new word as typed
    id: int  # -1 for a new word (outside the vocabulary)
    log_prob: float
    probability: float
    display: str = ""  # how to write it here (the model word when the version has no casing)
    correction: bool = False  # offered as a correction of a mistyped fragment

    def __post_init__(self) -> None:
        if not self.display:
            self.display = self.word


@dataclass(frozen=True)
class SuggestOptions:
    """Per-request switches (each also off service-wide by its setting)."""

    filter: bool = True  # leave out blocklisted words
    corrections: bool = True  # offer corrections of a mistyped fragment


@dataclass(frozen=True)
class Writing:
    """What the writer's text says about how the next word is written."""

    sentence_start: bool = False
    typed: str = ""  # the fragment as typed (case kept)

    @cached_property
    def case(self) -> int:
        """How every suggestion of this keystroke is written (``truecase.case_of``)."""
        return case_of(self.sentence_start, self.typed)

    @classmethod
    def of(cls, raw: str, split: SplitText, before: list[str] | None = None) -> Writing:
        """From a text and its split; ``before``: earlier committed words not in ``split`` (a
        session's recent words)."""
        return cls(starts_sentence([*(before or ()), *split.context]), typed_fragment(raw, split.prefix))


DEFAULT_OPTIONS = SuggestOptions()
# A correction beside matches of the fragment must be at least this likely to be what was meant
# (on Brown-LM valid, 5% instead kept out 0.6% of the intended words from the top 3).
MIN_CORRECTION_POSTERIOR = 0.01
PLAIN = Writing()


def select(
    version: LoadedVersion, row: np.ndarray | AdaptedRow, k: int, prefix: str = "", writing: Writing = PLAIN,
    options: SuggestOptions = DEFAULT_OPTIONS, exclude: frozenset[str] = frozenset(),
) -> tuple[list[Candidate], Selection]:
    """The suggestions for one next-word distribution (a model row or an adapted one): top-k words
    (completing ``prefix`` when given, skipping ``exclude``: suggestion rotation), merged with
    corrections of ``prefix`` when they are likelier, each with its written form."""
    adapted = row if isinstance(row, AdaptedRow) else AdaptedRow(row)
    top = select_words(version.index, adapted, k, prefix, exclude, filtered=options.filter)
    chosen: list[tuple[str, int, float, bool]] = [
        (w, i, lp, False) for w, i, lp in zip(top.words, top.ids, top.log_probs, strict=True)
    ]
    corrector = version.corrector if options.corrections else None
    bar = _bar(top, k) if prefix and corrector is not None else NO_BAR
    # Judged first from the best word of the whole row (no correction scores above it plus the
    # likeliest error): most keystrokes, a fragment with enough likely completions, then skip the
    # correction index; the corrector judges again from its candidates' best score.
    if corrector is not None and prefix and bar.cleared_by(adapted.best_log_prob + MAX_ERROR_LOG_PROB):
        fixes = corrector.correct(adapted.ranked(version.index), prefix, k + len(exclude), options.filter, bar)
        if not fixes.empty:
            chosen = _merge(chosen, top.mass, version.index.decode(fixes.ids), fixes.ids.tolist(),
                            fixes.scores.tolist(), fixes.log_total, k, exclude)
    casing = version.casing
    case = writing.case if casing is not None else AS_IS
    candidates = []
    for word, word_id, lp, fix in chosen:
        if casing is not None and word_id >= 0:
            display = casing.display_as(word_id, case)
        elif word_id < 0:  # a new word: as the writer last wrote it ("Ierulli")
            display = apply_case(adapted.written(word), case)
        else:
            display = apply_case(word, case)
        candidates.append(Candidate(word, word_id, lp, math.exp(lp), display, fix))
    return candidates, top


def _bar(top: Selection, k: int) -> Bar:
    """What a correction must score to enter the answer beside these matches (see :func:`_merge`):
    a posterior of at least :data:`MIN_CORRECTION_POSTERIOR` against the matches alone, and more
    than the k-th match's joint score (ties go to matches). Without matches (none, none likely,
    or all passed over already) nothing is barred."""
    if top.mass <= 0 or not top.ids:
        return NO_BAR
    log_matches = math.log(top.mass) + LOG_NO_ERROR
    beat = top.log_probs[k - 1] + log_matches if len(top.ids) >= k else -math.inf
    return Bar(log_matches + math.log(MIN_CORRECTION_POSTERIOR), beat)


def _logaddexp(a: float, b: float) -> float:
    """``log(exp(a) + exp(b))`` of two floats (numpy's ufunc costs more than the arithmetic)."""
    if a < b:
        a, b = b, a
    if a == -math.inf:
        return a
    return a + math.log1p(math.exp(b - a))


def _merge(matches: list[tuple[str, int, float, bool]], mass: float, words: list[str], ids: list[int],
           scores: list[float], log_total: float, k: int,
           exclude: frozenset[str] = frozenset()) -> list[tuple[str, int, float, bool]]:
    """Matches and corrections ranked together by P_model · P(fragment | word). A correction must
    reach a posterior of :data:`MIN_CORRECTION_POSTERIOR` unless nothing matches the fragment, so a
    short list of good matches is not padded with unlikely guesses. If no correction makes the top
    ``k`` the matches come back untouched; else all are posteriors. Corrections in ``exclude``
    (passed over already) are not offered again."""
    log_matches = (math.log(mass) if mass > 0 else -math.inf) + LOG_NO_ERROR
    log_z = _logaddexp(log_matches, log_total)
    floor = log_z + math.log(MIN_CORRECTION_POSTERIOR) if matches else -math.inf
    # A match's renormalised log-prob plus log(mass) is its model log-prob.
    joint = [(lp + log_matches, 0, n, word, word_id) for n, (word, word_id, lp, _) in enumerate(matches)]
    joint += [(s, 1, n, w, i) for n, (w, i, s) in enumerate(zip(words, ids, scores, strict=True))
              if s >= floor and w not in exclude]
    joint.sort(key=lambda j: (-j[0], j[1], j[2]))
    best = joint[:k]
    if not any(kind for _, kind, _, _, _ in best):
        return matches
    return [(word, word_id, score - log_z, kind == 1) for score, kind, _, word, word_id in best]
