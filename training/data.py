"""Corpora: the Brown-LM protocol, plain text files, and WikiText/PTB tokenised lines.

Every loader yields the corpus as one stream of words with ``<eos>`` after each sentence, which
is what the language model reads (state is carried across sentences).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nextword.text import EOS, UNK, tokenize
from nextword.vocab import Vocab


class CorpusError(Exception):
    """A corpus path that is missing, empty or in the wrong format."""


@dataclass
class Splits:
    train: list[str]
    valid: list[str]
    test: list[str]
    name: str
    protocol: str


def _require_files(files: list[Path], path: Path, what: str) -> list[Path]:
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist")
    if not files:
        raise CorpusError(f"no {what} found under {path}")
    return files


def brown_files(root: str | Path) -> list[Path]:
    """The Brown corpus sample files (``ca01`` .. ``cr09``), sorted by name."""
    root = Path(root)
    files = sorted(p for p in root.glob("c[a-r][0-9][0-9]") if p.is_file()) if root.is_dir() else []
    return _require_files(files, root, "Brown files (ca01..cr09)")


def brown_sentences(path: Path) -> Iterator[list[str]]:
    """Word part of each ``word/tag`` (split at the last ``/``), lowercased; one sentence a line."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tokens = line.split()
        if tokens:
            yield [t.rpartition("/")[0].lower() or t.lower() for t in tokens]


def stream(sentences: Iterable[list[str]]) -> list[str]:
    out: list[str] = []
    for sentence in sentences:
        out.extend(sentence)
        out.append(EOS)
    return out


def brown_lm(root: str | Path) -> Splits:
    """The Brown-LM protocol: file index i % 10 == 8 is valid, == 9 is test, the rest train."""
    files = brown_files(root)
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, path in enumerate(files):
        split = "valid" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
        parts[split].extend(stream(brown_sentences(path)))
    if not parts["train"]:
        raise CorpusError(f"Brown corpus at {root} has no sentences")
    return Splits(**parts, name="brown", protocol="brown-lm/1")


def ptb_lines(path: Path) -> list[str]:
    """WikiText/PTB format: already tokenised, one sentence a line, ``<unk>`` kept as is."""
    return stream(
        [w if w == UNK else w.lower() for w in line.split()]
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    )


def text_lines(path: Path) -> list[str]:
    """Free text through the serving tokenizer, one ``<eos>`` per sentence-ending mark or line."""
    out: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        words = tokenize(line)
        if words:
            out.extend(words)
            if words[-1] != EOS:
                out.append(EOS)
    return out


def directory_splits(root: str | Path, fmt: str) -> Splits:
    """``train/valid/test`` files (``*.train.txt`` style or a ``train.txt``) in ``fmt`` format."""
    root = Path(root)
    reader = ptb_lines if fmt == "ptb" else text_lines
    parts: dict[str, list[str]] = {}
    for split in ("train", "valid", "test"):
        candidates = sorted(root.glob(f"*{split}*")) if root.is_dir() else []
        _require_files(candidates, root, f"'{split}' file")
        parts[split] = [w for path in candidates for w in reader(path)]
    if not parts["train"]:
        raise CorpusError(f"the training split under {root} is empty")
    return Splits(**parts, name=root.name, protocol=f"{fmt}-dir")


def load_corpus(path: str | Path, fmt: str) -> Splits:
    """Load a corpus: ``brown`` (Brown-LM protocol), ``ptb`` or ``text`` (train/valid/test files)."""
    if fmt == "brown":
        return brown_lm(path)
    if fmt in ("ptb", "text"):
        return directory_splits(path, fmt)
    raise CorpusError(f"unknown corpus format {fmt!r}; use brown, ptb or text")


def build_vocab(train: list[str], min_count: int = 3, max_size: int | None = None) -> Vocab:
    return Vocab.build(Counter(train), min_count=min_count, max_size=max_size)
