"""How a suggestion is written: the word's usual form, capitalised at a sentence start, following
the case of the fragment being typed.

Presentation only: the model reads and scores lowercase words, so nothing here moves a
probability. A version without casing statistics (no ``casing.tsv``) writes every word as the
model word, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nextword.casing import cap_first, read_casing
from nextword.text import EOS
from nextword.vocab import Vocab

# How model words are written: Brown's quote marks become plain quotes.
_RENDER = {"``": '"', "''": '"', "`": "'", "-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]"}
# Marks after which a word still starts the sentence ("<eos> `` The ...").
_OPENERS = {"``", "`", "(", "[", "{", "-lrb-", "-lsb-"}


class TrueCase:
    """Usual written form of every vocabulary word, by id (built once per model version)."""

    def __init__(self, vocab: Vocab, usual: dict[str, str]) -> None:
        self.forms: list[str] = [usual.get(w, w) for w in vocab.itos]

    @classmethod
    def load(cls, path: Path, vocab: Vocab) -> TrueCase:
        return cls(vocab, read_casing(path).usual_forms(vocab.stoi))

    def display(self, word_id: int, sentence_start: bool, typed: str = "") -> str:
        return self.display_as(word_id, case_of(sentence_start, typed))

    def display_as(self, word_id: int, case: int) -> str:
        """:meth:`display` with the case already worked out (:func:`case_of`): a keystroke's
        suggestions all share it."""
        return apply_case(render_word(self.forms[word_id]), case)


def render_word(word: str) -> str:
    """How one model word is written in text (Brown's quote marks and bracket names as marks)."""
    return _RENDER.get(word, word)


AS_IS, CAPITALISED, CAPITALS = 0, 1, 2  # how a form is written (:func:`case_of`)


def case_of(sentence_start: bool, typed: str = "") -> int:
    """How words are written here: all capitals after a fragment typed in capitals ("US" →
    "USE", two letters or more), a capital first letter after a fragment starting with one or at
    a sentence start, else as the form is (so "joh" still offers "John")."""
    letters = [ch for ch in typed if ch.isalpha()]
    if len(letters) >= 2 and all(ch.isupper() for ch in letters):
        return CAPITALS
    if (letters and letters[0].isupper()) or sentence_start:
        return CAPITALISED
    return AS_IS


def apply_case(form: str, case: int) -> str:
    if case == AS_IS:
        return form
    return form.upper() if case == CAPITALS else cap_first(form)


def write_as(form: str, sentence_start: bool, typed: str = "") -> str:
    """``form`` as it should appear after ``typed`` (:func:`case_of`)."""
    return apply_case(form, case_of(sentence_start, typed))


def starts_sentence(words: Sequence[str], before: int | None = None) -> bool:
    """Whether the next word starts a sentence: nothing (or only opening marks) since the last
    ``<eos>`` or the start of the text. ``before`` is the id-free answer for an empty ``words``
    when earlier context exists elsewhere (a session's committed state): pass whether that
    context ended a sentence."""
    for word in reversed(words):
        if word in _OPENERS:
            continue
        return word == EOS
    return True if before is None else before


def typed_fragment(raw: str, prefix: str) -> str:
    """The fragment as the user typed it (case kept): the last ``len(prefix)`` characters of the
    raw text when they are the prefix in some case, else the lowercased prefix."""
    if not prefix:
        return ""
    tail = raw[len(raw) - len(prefix):]
    return tail if tail.lower() == prefix else prefix
