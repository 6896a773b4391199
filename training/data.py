"""Corpora: the Brown-LM protocol, plain text files, and WikiText/PTB tokenised lines.

Every loader yields the corpus as one stream of words with ``<eos>`` after each sentence, which
is what the language model reads (state is carried across sentences).

Plain text needs no prepared splits (``text`` format, or ``auto`` on a file or a folder without
``train``/``valid``/``test`` files); the split is deterministic:

* a folder of at least 10 ``.txt`` documents (found recursively, sorted by relative path) is split
  by document as in the Brown-LM protocol: document index i % 10 == 8 is valid, == 9 is test, the
  rest train;
* one file, or a folder of fewer than 10 documents (read in that order), is split by line: of the
  non-empty lines, the first 80% are train, the next 10% valid, the last 10% test (contiguous, so
  valid and test are text the model has not seen the surroundings of).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nextword.text import EOS, UNK, tokenize, tokenize_cased
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


def brown_sentences(path: Path, lower: bool = True) -> Iterator[list[str]]:
    """Word part of each ``word/tag`` (split at the last ``/``), lowercased unless ``lower`` is
    False; one sentence a line."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tokens = line.split()
        if tokens:
            words = [t.rpartition("/")[0] or t for t in tokens]
            yield [w.lower() for w in words] if lower else words


def stream(sentences: Iterable[list[str]]) -> list[str]:
    out: list[str] = []
    for sentence in sentences:
        out.extend(sentence)
        out.append(EOS)
    return out


def brown_split_of(index: int) -> str:
    """The Brown-LM split of the file at ``index`` in name order: i % 10 == 8 valid, == 9 test."""
    return "valid" if index % 10 == 8 else "test" if index % 10 == 9 else "train"


def brown_lm(root: str | Path) -> Splits:
    """The Brown-LM protocol splits (see :func:`brown_split_of`)."""
    files = brown_files(root)
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, path in enumerate(files):
        parts[brown_split_of(i)].extend(stream(brown_sentences(path)))
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
    return _words(_read_lines(path))


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


SPLIT_NAMES = ("train", "valid", "test")
MIN_DOCUMENTS = 10  # fewer documents than this are split by line
MIN_LINES = 10


def _has_split_files(root: Path) -> bool:
    return any(next(root.glob(f"*{split}*"), None) is not None for split in SPLIT_NAMES)


def _text_documents(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _line_split(lines: list[str], where: Path) -> dict[str, list[str]]:
    lines = [line for line in lines if line.strip()]
    if len(lines) < MIN_LINES:
        raise CorpusError(f"{where} has {len(lines)} non-empty lines; a split by line needs at least {MIN_LINES}")
    a, b = int(len(lines) * 0.8), int(len(lines) * 0.9)
    return {"train": lines[:a], "valid": lines[a:b], "test": lines[b:]}


def _words(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        words = tokenize(line)
        if words:
            out.extend(words)
            if words[-1] != EOS:
                out.append(EOS)
    return out


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def text_corpus(path: str | Path) -> Splits:
    """Free text without prepared splits: one file or a folder of ``.txt`` documents, split
    deterministically by document or by line (see the module docstring)."""
    path = Path(path)
    parts, protocol = _text_parts(path)
    splits = {split: _words(lines) for split, lines in parts.items()}
    for split, words in splits.items():
        if not words:
            raise CorpusError(f"the {split} split of {path} is empty")
    return Splits(**splits, name=path.stem if path.is_file() else path.name, protocol=protocol)


def _text_parts(path: Path) -> tuple[dict[str, list[str]], str]:
    """The lines of each split of a text corpus without prepared splits, and the protocol name."""
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist")
    if path.is_file():
        return _line_split(_read_lines(path), path), "text-lines/1"
    docs = _text_documents(path)
    if not docs:
        raise CorpusError(f"no 'train' file or .txt documents found under {path}")
    if len(docs) < MIN_DOCUMENTS:
        return _line_split([line for doc in docs for line in _read_lines(doc)], path), "text-lines/1"
    parts: dict[str, list[str]] = {split: [] for split in SPLIT_NAMES}
    for i, doc in enumerate(docs):
        parts[brown_split_of(i)].extend(_read_lines(doc))
    return parts, "text-docs/1"


def detect_format(path: str | Path) -> str:
    """``auto``: a file is ``text``; a folder with Brown files is ``brown``; any other folder is
    ``text`` (prepared train/valid/test files, or documents to split)."""
    path = Path(path)
    if path.is_dir() and any(path.glob("c[a-r][0-9][0-9]")):
        return "brown"
    return "text"


def cased_sentences(path: str | Path, fmt: str) -> Iterator[list[str]]:
    """The training split's sentences with their case kept (for the casing statistics), split
    into train/valid/test exactly as :func:`load_corpus` splits them.

    ``brown`` keeps case in its files; ``text`` goes through the serving tokenizer without
    lowercasing (a line break or a sentence-final mark ends a sentence); ``ptb`` corpora are
    lowercased and have no case to count."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "brown":
        for i, file in enumerate(brown_files(path)):
            if brown_split_of(i) == "train":
                yield from brown_sentences(file, lower=False)
        return
    if fmt != "text":
        raise CorpusError(f"a {fmt!r} corpus is lowercased: it has no casing to count (use brown or text)")
    root = Path(path)
    if root.is_dir() and _has_split_files(root):
        files = _require_files(sorted(root.glob("*train*")), root, "'train' file")
        lines = [line for file in files for line in _read_lines(file)]
    else:
        lines = _text_parts(root)[0]["train"]
    for line in lines:
        sentence: list[str] = []
        for word in tokenize_cased(line):
            if word == EOS:
                yield sentence
                sentence = []
            else:
                sentence.append(word)
        if sentence:
            yield sentence


def load_corpus(path: str | Path, fmt: str) -> Splits:
    """Load a corpus: ``brown`` (Brown-LM protocol), ``ptb`` (train/valid/test files), ``text``
    (train/valid/test files, or one file or a folder of documents to split), or ``auto``."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "brown":
        return brown_lm(path)
    if fmt == "ptb":
        return directory_splits(path, fmt)
    if fmt == "text":
        root = Path(path)
        if root.is_dir() and _has_split_files(root):
            return directory_splits(root, fmt)
        return text_corpus(root)
    raise CorpusError(f"unknown corpus format {fmt!r}; use auto, brown, ptb or text")


def split_documents(path: str | Path, fmt: str, split: str) -> list[list[str]]:
    """A split as its documents, in reading order (concatenated, they are the split's stream):
    one per Brown file for ``brown``, the whole split as one document otherwise. A session-like
    cache starts afresh at each document."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "brown":
        return [stream(brown_sentences(p)) for i, p in enumerate(brown_files(path)) if brown_split_of(i) == split]
    return [getattr(load_corpus(path, fmt), split)]


def build_vocab(train: list[str], min_count: int = 3, max_size: int | None = None) -> Vocab:
    return Vocab.build(Counter(train), min_count=min_count, max_size=max_size)
