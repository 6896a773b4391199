"""The word tokenizer shared by training and serving (torch-free).

Free text becomes the same kind of words the Brown-LM protocol trains on: lowercased,
punctuation split off, contractions and hyphenated words kept whole, common abbreviations
(``mr.``, ``u.s.``) kept whole, and ``<eos>`` after a sentence-final mark.

Tokenization is *chunk-local*: text is split at whitespace and every chunk is tokenized on its
own. That is what makes streaming exact: once whitespace follows a chunk, its words can never
change, so a session may commit them to the recurrent state and never look at them again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNK = "<unk>"
EOS = "<eos>"
SPECIAL_TOKENS = (UNK, EOS)

_ABBREVIATIONS = (
    "mr mrs ms dr st jr sr co corp inc ltd gen gov sen rep rev prof capt col lt sgt maj mt ft "
    "vs etc jan feb mar apr aug sept sep oct nov dec no nos vol pp ave blvd dept univ"
).split()

_QUOTES = str.maketrans({"“": "``", "”": "''", "‘": "'", "’": "'", "–": "--", "—": "--"})

_TOKEN = re.compile(
    r"""
    (?:[^\W\d_]\.){2,}                                   # u.s.  p.m.
    | (?:ABBREVIATIONS)\.(?![^\W_])                                # mr.  gen.
    | \d+(?:[.,:/]\d+)*(?:[^\W\d_]+)?                      # 1,000  3.5  1960s
    | [^\W_]+(?:['&-][^\W_]+)*(?:'(?!'))?                  # don't  anti-trust  boys'
    | ``|''|--|\.\.\.                                     # multi-character marks
    | [^\w\s]                                              # any other single mark
    """.replace("ABBREVIATIONS", "|".join(_ABBREVIATIONS)),
    re.VERBOSE,
)

# A chunk whose last word (before closing quotes/brackets) is one of these ends a sentence:
# the model then sees <eos>, as in training.
_SENTENCE_END = {".", "!", "?", "..."}
_CLOSERS = {"''", "'", ")"}
# Characters that may still be growing a word when the text stops: a prefix to complete.
_PARTIAL_WORD = re.compile(r"[^\W_][\w'&-]*$")
_LAST_CHUNK = re.compile(r"\S*$")


def _normalise(chunk: str, lower: bool = True) -> str:
    chunk = (chunk.lower() if lower else chunk).translate(_QUOTES)
    # A straight double quote opens when it starts the chunk, closes otherwise (Brown's `` and '').
    if chunk.startswith('"'):
        chunk = "``" + chunk[1:]
    return chunk.replace('"', "''")


def tokenize_chunk(chunk: str) -> list[str]:
    """Words of one whitespace-free chunk, with ``<eos>`` appended after a sentence end."""
    chunk = _normalise(chunk)
    words = _TOKEN.findall(chunk)
    end = len(words)
    while end and words[end - 1] in _CLOSERS:
        end -= 1
    if end and words[end - 1] in _SENTENCE_END:
        words.append(EOS)
    return words


def tokenize_cased(text: str) -> list[str]:
    """Like :func:`tokenize`, but each word keeps the case it was written in (for counting how
    words are written; the model never reads these). A chunk whose lowercase changes length
    (rare characters such as "İ") is returned lowercase."""
    out: list[str] = []
    for chunk in text.split():
        lowered, kept = _normalise(chunk), _normalise(chunk, lower=False)
        words = tokenize_chunk(chunk)
        if len(lowered) != len(kept):
            out.extend(words)
            continue
        spans = [m.span() for m in _TOKEN.finditer(lowered)]
        out.extend(kept[a:b] for a, b in spans)
        out.extend(words[len(spans):])  # the <eos> a sentence end adds
    return out


def tokenize(text: str) -> list[str]:
    """All words of ``text`` (every chunk complete), as used for training on plain text."""
    return [w for chunk in text.split() for w in tokenize_chunk(chunk)]


def as_written(words: list[str], cased: list[str]) -> list[str]:
    """``words`` (lowercase tokens) each in the case ``cased`` (the same tokens as written, from
    :func:`tokenize_cased`) gives it, where the two line up; elsewhere the word stays lowercase."""
    if len(cased) < len(words):
        return list(words)
    return [c if c.lower() == w else w for w, c in zip(words, cased, strict=False)]


@dataclass(frozen=True)
class SplitText:
    """Text split the way a keyboard sees it.

    ``committed``: words of chunks followed by whitespace (final; safe to commit to state).
    ``tail``: words of the last chunk when no whitespace follows it (complete but revisable).
    ``prefix``: the word being typed (lowercased), or ``""`` when the text ends a word.
    ``pending``: the raw last chunk (what a session keeps uncommitted).
    """

    committed: list[str]
    tail: list[str]
    prefix: str
    pending: str

    @property
    def context(self) -> list[str]:
        return self.committed + self.tail

    def written(self, text: str) -> tuple[list[str], list[str]]:
        """``committed`` and ``tail`` as written in ``text`` (the text this split was made from):
        each word in the case it was typed in where it can be lined up, else lowercase. What a
        new word (outside the vocabulary) is offered as."""
        head = text[: len(text) - len(self.pending)]
        committed = as_written(self.committed, tokenize_cased(head)) if self.committed else []
        tail = as_written(self.tail, tokenize_cased(self.pending)[: len(self.tail)]) if self.tail else []
        return committed, tail


def split_text(text: str) -> SplitText:
    """Split text into committed words, the unfinished last chunk, and the prefix being typed."""
    if not text or text[-1].isspace():
        return SplitText(tokenize(text), [], "", "")
    last = _LAST_CHUNK.search(text).group()
    head = text[: len(text) - len(last)]
    committed = tokenize(head)
    normal = _normalise(last)
    partial = _PARTIAL_WORD.search(normal)
    if partial is None:
        return SplitText(committed, tokenize_chunk(last), "", last)
    start = partial.start()
    # Keep abbreviation/number context whole: "u.s" is typed as a prefix of "u.s.".
    while start > 0 and normal[start - 1] == "." and start > 1 and normal[start - 2].isalpha():
        start -= 2
    tail = _TOKEN.findall(normal[:start])
    return SplitText(committed, tail, normal[start:], last)
