"""Vocabulary: word <-> id, with ``<unk>`` at 0 and ``<eos>`` at 1, saved as one word a line."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

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
        swapped: Damerau distance 1, the error behind most typos) turns a vocabulary word into
        ``word`` (a word outside the vocabulary), which may then be a slip on it.

        A few dozen hash lookups, whatever the word: a vocabulary word with a letter left out or
        changed is found among the hashes of its patterns (:attr:`_edit_hashes`), one with a letter
        added or two swapped by looking up ``word``'s deletions and swaps. Answers are also
        remembered (a bounded dict), as a text's new words recur on every commit."""
        known = self._near.get(word)
        if known is None:
            n = len(word)
            probes = [hash(word)] + [hash(word[:i] + _ANY + word[i + 1 :]) for i in range(n)]
            table = self._edit_hashes
            at = np.minimum(np.searchsorted(table, probes), max(table.size - 1, 0))
            known = (table.size > 0 and bool(np.any(table[at] == probes))) or any(
                word[:i] + word[i + 1 :] in self.stoi for i in range(n)
            ) or any(word[:i] + word[i + 1] + word[i] + word[i + 2 :] in self.stoi for i in range(n - 1))
            if len(self._near) >= _NEAR_MEMO:
                self._near.clear()
            self._near[word] = known
        return known

    def prepare_near_word(self) -> None:
        """Build :meth:`near_word`'s index now (a service loading a model) rather than on a
        writer's first new word."""
        _ = self._edit_hashes

    @cached_property
    def _edit_hashes(self) -> np.ndarray:
        """Sorted hashes of every vocabulary word with one letter removed ("the" → "he", "te",
        "th": a word equal to one is that vocabulary word with a letter left out) and with one
        letter replaced by a wildcard ("?he", "t?e", "th?": a word with the same pattern at some
        position is that vocabulary word with a letter changed). ~244,000 hashes (2 MB) for the
        default model, built on first use in ~0.15 s."""
        words = self.itos[len(SPECIAL_TOKENS) :]
        found = {hash(w[:i] + w[i + 1 :]) for w in words for i in range(len(w))}
        found.update(hash(w[:i] + _ANY + w[i + 1 :]) for w in words for i in range(len(w)))
        return np.sort(np.fromiter(found, np.int64, len(found)))


_NEAR_MEMO = 1 << 16
_ANY = "\0"  # the wildcard of a changed letter: never part of a word
