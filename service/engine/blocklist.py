"""The offensive-word filter: which words a selection never offers while filtering is on.

The service ships a default list (``blocklist.txt`` beside this module: slurs and strong profanity
found in the default model's vocabulary, with what was left out and why). ``NEXTWORD_BLOCKLIST``
names another file, or ``off``. A request turns the filter off for itself with ``filter: false``;
scoring never filters. Blocking happens at selection time (:class:`VocabIndex` masks), so the
model's probabilities are untouched: predictions are renormalised over the words still offered.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nextword.vocab import Vocab

DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")
DEFAULT = "default"
OFF = "off"


class BlocklistError(Exception):
    """A blocklist file that cannot be read."""


def blocklist_path(setting: str) -> Path | None:
    """The file a ``NEXTWORD_BLOCKLIST`` value names (``None`` for ``off``)."""
    if setting == OFF:
        return None
    return DEFAULT_BLOCKLIST if setting == DEFAULT else Path(setting)


def read_blocklist(path: Path | None) -> frozenset[str]:
    """Lowercased words of a list file: one a line, blank lines and ``#`` comments ignored."""
    if path is None:
        return frozenset()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BlocklistError(f"cannot read the blocklist {path}: {exc}") from exc
    words = (line.split("#", 1)[0].strip().lower() for line in text.splitlines())
    return frozenset(w for w in words if w)


def blocked_ids(vocab: Vocab, words: Iterable[str]) -> list[int]:
    """Ids of the listed words that the vocabulary holds (others cannot be offered anyway)."""
    return sorted(vocab.stoi[w] for w in words if w in vocab.stoi)
