"""Vocabulary: word <-> id, with ``<unk>`` at 0 and ``<eos>`` at 1, saved as one word a line."""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from nextword.text import EOS, SPECIAL_TOKENS, UNK


class Vocab:
    def __init__(self, words: Iterable[str]) -> None:
        self.itos: list[str] = list(words)
        if self.itos[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate words")
        self.unk_id = self.stoi[UNK]
        self.eos_id = self.stoi[EOS]
        self._near: dict[str, bool] = {}  # near_word's answers (a text's new words recur)

    @classmethod
    def build(cls, counts: Counter[str], min_count: int = 1, max_size: int | None = None) -> Vocab:
        """Most frequent words first (ties alphabetical), keeping those seen ``min_count`` times."""
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(SPECIAL_TOKENS))]
        return cls([*SPECIAL_TOKENS, *ranked])

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls(Path(path).read_text(encoding="utf-8").split("\n")[:-1])

    def save(self, path: str | Path) -> None:
        Path(path).write_text("".join(w + "\n" for w in self.itos), encoding="utf-8")

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Iterable[str]) -> list[int]:
        unk = self.unk_id
        return [self.stoi.get(w, unk) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def is_special(self, word: str) -> bool:
        return word in SPECIAL_TOKENS

    def near_word(self, word: str) -> bool:
        """Whether one typing error (a letter left out, added or changed, or two adjacent letters
        swapped: Damerau distance 1, the error behind most typos) turns the vocabulary word into
        ``word``, which may then be a slip on it. Answers are remembered (a bounded dict)."""
        known = self._near.get(word)
        if known is None:
            known = any(w in self.stoi for w in _one_edit(word))
            if len(self._near) >= _NEAR_MEMO:
                self._near.clear()
            self._near[word] = known
        return known


_NEAR_MEMO = 1 << 16
_LETTERS = string.ascii_lowercase


def _one_edit(word: str) -> Iterable[str]:
    """Every string one edit from ``word`` (deletions and swaps first: the cheapest to try)."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    yield from (a + b[1:] for a, b in splits if b)
    yield from (a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1)
    yield from (a + c + b[1:] for a, b in splits if b for c in _LETTERS if c != b[0])
    yield from (a + c + b for a, b in splits for c in _LETTERS)
