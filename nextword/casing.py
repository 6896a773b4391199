"""True case: how each vocabulary word is usually written, counted from a cased corpus.

Models read lowercase words; a keyboard shows words as a writer types them ("I", "John",
"United", "the"). Training counts every surface form of every word *away from the start of a
sentence* (a capital there says nothing about the word) and stores the counts in the model
artifact as ``casing.tsv`` (see ``models/README.md``). The service takes the most frequent form as
the word's usual form. Torch-free: training writes the file with :func:`write_casing`, the service
reads it with :func:`read_casing`.

File format (UTF-8, one line per form, sorted by word then form)::

    # nextword-casing/1	word	form	count	initial
    united	United	412	37
    united	united	20	3

``count`` is the occurrences of ``form`` not at a sentence start, ``initial`` those at one. Only
words seen with some non-lowercase form are listed; a word without lines is written lowercase.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

HEADER = "# nextword-casing/1\tword\tform\tcount\tinitial"
# Marks that may open a sentence before its first word (the word after them is still initial).
_OPENERS = {"``", "`", "'", '"', "(", "[", "{", "--", "-lrb-", "-lsb-"}


class CasingError(Exception):
    """A casing file that does not follow the format."""


@dataclass
class CaseCounts:
    """Per lowercase word, per surface form: ``[count away from a sentence start, count at one]``."""

    forms: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def add_sentence(self, tokens: Iterable[str]) -> None:
        """Count one sentence of case-preserving tokens (its first word is sentence-initial)."""
        initial = True
        for token in tokens:
            if initial and (token in _OPENERS or not any(ch.isalpha() for ch in token)):
                continue  # an opening quote or bracket: the next word still starts the sentence
            slot = self.forms.setdefault(token.lower(), {}).setdefault(token, [0, 0])
            slot[1 if initial else 0] += 1
            initial = False

    def usual_forms(self, words: Iterable[str] | None = None) -> dict[str, str]:
        """``{word: usual form}`` for words whose usual form is not the lowercase word itself."""
        return {w: f for w, f in ((w, usual_form(w, c)) for w, c in self.forms.items()
                                  if words is None or w in words) if f != w}


def usual_form(word: str, forms: dict[str, list[int]]) -> str:
    """The form seen most often away from sentence starts (ties: lowercase first, then the fewest
    capitals). A word seen only at sentence starts is lowercase: its capital proves nothing."""
    best, best_key = word, (0, 1, 0)
    for form, (count, _initial) in forms.items():
        key = (count, form == word, -sum(ch.isupper() for ch in form))
        if count and key > best_key:
            best, best_key = form, key
    return best


def write_casing(path: str | Path, counts: CaseCounts, vocabulary: Iterable[str]) -> int:
    """Write the counts of the vocabulary's words that have a non-lowercase form; returns lines."""
    words = set(vocabulary)
    lines = [HEADER]
    for word in sorted(w for w in counts.forms if w in words):
        forms = counts.forms[word]
        if all(form == word for form in forms):
            continue
        for form in sorted(forms):
            count, initial = forms[form]
            lines.append(f"{word}\t{form}\t{count}\t{initial}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines) - 1


def read_casing(path: str | Path) -> CaseCounts:
    counts = CaseCounts()
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    if not lines or lines[0] != HEADER:
        raise CasingError(f"{path} does not start with the header {HEADER!r}")
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 4 or parts[1].lower() != parts[0] or not (parts[2].isdigit() and parts[3].isdigit()):
            raise CasingError(f"{path}:{n}: expected word, form (that word in some case), count, initial")
        counts.forms.setdefault(parts[0], {})[parts[1]] = [int(parts[2]), int(parts[3])]
    return counts


def count_cased(sentences: Iterable[Iterable[str]]) -> CaseCounts:
    counts = CaseCounts()
    for sentence in sentences:
        counts.add_sentence(sentence)
    return counts


def preserve_case(original: str, lowered: str) -> str:
    """``original`` if lowercasing it gives ``lowered`` character for character, else ``lowered``
    (the few characters whose lowercase changes length cannot be mapped back)."""
    return original if len(original) == len(lowered) and original.lower() == lowered else lowered


def cap_first(form: str) -> str:
    """Capitalise the first letter, keeping the rest as it is ("mcdonald's" → "Mcdonald's",
    "McDonald" stays)."""
    for i, ch in enumerate(form):
        if ch.isalpha():
            return form[:i] + ch.upper() + form[i + 1:]
    return form

