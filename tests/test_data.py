"""Corpus loaders: the Brown-LM protocol, ptb/text directories, and their errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nextword.text import EOS, UNK
from training.data import CorpusError, build_vocab, load_corpus

BROWN = Path(__file__).resolve().parents[2] / "shared/data/brown"


def _brown_names(n: int) -> list[str]:
    """ca01..ca10, cb01..cb10, ...: sorted order is file-index order."""
    return [f"c{chr(ord('a') + i // 10)}{i % 10 + 1:02d}" for i in range(n)]


@pytest.fixture
def brown_dir(tmp_path: Path) -> Path:
    """20 Brown-like files; file k holds two sentences (and blank/indented lines) marked with k."""
    root = tmp_path / "brown"
    root.mkdir()
    for k, name in enumerate(_brown_names(20)):
        (root / name).write_text(
            f"\n\n\tThe/at Cat{k}/nn sat/vbd ./.\n"
            "   \n"
            f"\tA/at b/c/nn-tl said/vbd ``/`` AT&T/np ''/'' f{k}/nn ./.\n",
            encoding="utf-8",
        )
    # not part of the corpus
    (root / "CONTENTS").write_text("ca01 press\n")
    (root / "README").write_text("the brown corpus\n")
    (root / "cats.txt").write_text("x/y\n")
    return root


def _sentences(k: int) -> list[str]:
    return ["the", f"cat{k}", "sat", ".", EOS, "a", "b/c", "said", "``", "at&t", "''", f"f{k}", ".", EOS]


def test_brown_file_names() -> None:
    assert _brown_names(20)[:2] == ["ca01", "ca02"] and _brown_names(20)[9:11] == ["ca10", "cb01"]
    assert _brown_names(20)[-1] == "cb10"


def test_brown_lm_split_and_tokens(brown_dir: Path) -> None:
    splits = load_corpus(brown_dir, "brown")
    assert (splits.name, splits.protocol) == ("brown", "brown-lm/1")
    valid_idx = [i for i in range(20) if i % 10 == 8]
    test_idx = [i for i in range(20) if i % 10 == 9]
    train_idx = [i for i in range(20) if i % 10 < 8]
    assert (valid_idx, test_idx) == ([8, 18], [9, 19])
    assert splits.train == [w for k in train_idx for w in _sentences(k)]
    assert splits.valid == [w for k in valid_idx for w in _sentences(k)]
    assert splits.test == [w for k in test_idx for w in _sentences(k)]


def test_brown_vocab_min_count_three(brown_dir: Path) -> None:
    train = load_corpus(brown_dir, "brown").train
    vocab = build_vocab(train)  # default min count 3
    counts = Counter(train)
    assert vocab.itos[:2] == [UNK, EOS]
    assert set(vocab.itos[2:]) == {w for w, c in counts.items() if c >= 3 and w != EOS}
    assert "cat0" not in vocab.stoi and "the" in vocab.stoi
    assert vocab.encode(["cat0"]) == [vocab.unk_id]
    assert build_vocab(train, min_count=1).stoi.keys() >= {"cat0", "f15"}


def test_ptb_directory(tmp_path: Path) -> None:
    (tmp_path / "ptb.train.txt").write_text(" The cat <unk> sat \n\n a N b\n")
    (tmp_path / "ptb.valid.txt").write_text("the Dog\n")
    (tmp_path / "ptb.test.txt").write_text("<unk> mat\n")
    splits = load_corpus(tmp_path, "ptb")
    assert splits.train == ["the", "cat", UNK, "sat", EOS, "a", "n", "b", EOS]
    assert splits.valid == ["the", "dog", EOS]
    assert splits.test == [UNK, "mat", EOS]
    assert (splits.name, splits.protocol) == (tmp_path.name, "ptb-dir")


def test_text_directory(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("Hello, world! This is Mr. Smith\nNo end here\n\n")
    (tmp_path / "valid.txt").write_text("Don't stop.\n")
    (tmp_path / "test.txt").write_text("\"Quoted\" words\n")
    splits = load_corpus(tmp_path, "text")
    assert splits.train == ["hello", ",", "world", "!", EOS, "this", "is", "mr.", "smith", EOS,
                            "no", "end", "here", EOS]
    assert splits.valid == ["don't", "stop", ".", EOS]
    assert splits.test == ["``", "quoted", "''", "words", EOS]
    assert splits.protocol == "text-dir"


def test_missing_path(tmp_path: Path) -> None:
    for fmt in ("brown", "ptb", "text"):
        with pytest.raises(CorpusError, match="does not exist"):
            load_corpus(tmp_path / "nope", fmt)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no Brown files"):
        load_corpus(tmp_path, "brown")
    for fmt in ("ptb", "text"):
        with pytest.raises(CorpusError, match="'train' file"):
            load_corpus(tmp_path, fmt)


def test_missing_split_file(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("a b\n")
    (tmp_path / "test.txt").write_text("a b\n")
    with pytest.raises(CorpusError, match="'valid' file"):
        load_corpus(tmp_path, "ptb")


def test_empty_corpus(tmp_path: Path) -> None:
    brown = tmp_path / "brown"
    brown.mkdir()
    for name in _brown_names(3):
        (brown / name).write_text("\n\n   \n")
    with pytest.raises(CorpusError, match="no sentences"):
        load_corpus(brown, "brown")
    plain = tmp_path / "plain"
    plain.mkdir()
    for split in ("train", "valid", "test"):
        (plain / f"{split}.txt").write_text("\n \n")
    for fmt in ("ptb", "text"):
        with pytest.raises(CorpusError, match="empty"):
            load_corpus(plain, fmt)


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="unknown corpus format"):
        load_corpus(tmp_path, "conll")


@pytest.mark.skipif(not BROWN.is_dir(), reason=f"the Brown corpus is not at {BROWN}")
def test_real_brown_protocol_figures() -> None:
    splits = load_corpus(BROWN, "brown")
    assert len(splits.train) == 975_903
    assert len(splits.valid) == 121_184
    assert len(splits.test) == 121_445
    assert len(build_vocab(splits.train, min_count=3)) == 17_977


def _numbered_lines(n: int, tag: str = "") -> str:
    return "".join(f"Line {tag}{i} says hello.\n\n" for i in range(n))  # blank lines do not count


def test_one_text_file_is_split_by_line(tmp_path: Path) -> None:
    path = tmp_path / "my.txt"
    path.write_text(_numbered_lines(20))
    for fmt in ("text", "auto"):
        splits = load_corpus(path, fmt)
        firsts = [splits_words[i + 1] for splits_words in (splits.train, splits.valid, splits.test)
                  for i, w in enumerate(splits_words) if w == "line"]
        assert firsts == [str(i) for i in range(20)]  # contiguous, in order, nothing lost
        assert splits.train.count("line") == 16 and splits.valid.count("line") == 2 and splits.test.count("line") == 2
        assert splits.valid[:3] == ["line", "16", "says"] and splits.test[:3] == ["line", "18", "says"]
        assert (splits.name, splits.protocol) == ("my", "text-lines/1")
    assert load_corpus(path, "text") == load_corpus(path, "text")  # deterministic


def test_text_file_too_small_to_split(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text(_numbered_lines(9))
    with pytest.raises(CorpusError, match="at least 10"):
        load_corpus(path, "auto")


def test_folder_of_documents_is_split_by_document(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    for k in range(12):  # names sort as doc00..doc11, one inside a subfolder
        where = root / "sub" if k == 5 else root
        (where if k != 5 else root / "sub").joinpath(f"doc{k:02d}.txt").write_text(f"Document d{k} here.\n")
    (root / "notes.md").write_text("not a document\n")
    splits = load_corpus(root, "auto")
    docs = {name: [w for w in words if w.startswith("d") and w[1:].isdigit()]
            for name, words in (("train", splits.train), ("valid", splits.valid), ("test", splits.test))}
    # relative paths sort doc00..doc11 then sub/doc05: index 8 is doc09, index 9 is doc10
    assert docs == {"train": ["d0", "d1", "d2", "d3", "d4", "d6", "d7", "d8", "d11", "d5"], "valid": ["d9"],
                    "test": ["d10"]}
    assert "not" not in splits.train
    assert (splits.name, splits.protocol) == ("docs", "text-docs/1")


def test_few_documents_are_split_by_line(tmp_path: Path) -> None:
    root = tmp_path / "few"
    root.mkdir()
    (root / "a.txt").write_text(_numbered_lines(10, "a"))
    (root / "b.txt").write_text(_numbered_lines(10, "b"))
    splits = load_corpus(root, "text")
    assert splits.protocol == "text-lines/1"
    assert "a0" in splits.train and "b5" in splits.train and splits.valid[1] == "b6" and splits.test[1] == "b8"


def test_auto_format_detection(brown_dir: Path, tmp_path: Path) -> None:
    assert load_corpus(brown_dir, "auto") == load_corpus(brown_dir, "brown")
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split in ("train", "valid", "test"):
        (prepared / f"{split}.txt").write_text(f"The {split} text.\n")
    assert load_corpus(prepared, "auto").protocol == "text-dir"
