"""The shared tokenizer (``nextword.text``) and vocabulary (``nextword.vocab``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextword.text import EOS, UNK, split_text, tokenize, tokenize_chunk
from nextword.vocab import Vocab


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Hello, world!", ["hello", ",", "world", "!", EOS]),
        ("a;b: (c)", ["a", ";", "b", ":", "(", "c", ")"]),
        ("Wait... what?", ["wait", "...", EOS, "what", "?", EOS]),
        ("yes--no", ["yes", "--", "no"]),
    ],
)
def test_punctuation_is_split(text: str, words: list[str]) -> None:
    assert tokenize(text) == words


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("I don't know", ["i", "don't", "know"]),
        ("She's here, they'll go", ["she's", "here", ",", "they'll", "go"]),
        ("the boys' toys", ["the", "boys'", "toys"]),
        ("anti-trust law", ["anti-trust", "law"]),
        ("A&P", ["a&p"]),
    ],
)
def test_contractions_and_compounds_stay_whole(text: str, words: list[str]) -> None:
    assert tokenize(text) == words


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Mr. Smith", ["mr.", "smith"]),
        ("Dr. No went to the U.S. today.", ["dr.", "no", "went", "to", "the", "u.s.", "today", ".", EOS]),
        ("at 3 p.m. sharp", ["at", "3", "p.m.", "sharp"]),
        ("Gen. Lee", ["gen.", "lee"]),
        ("generally.", ["generally", ".", EOS]),  # "gen" inside a word is no abbreviation
        ("1,000 men in the 1960s; 3.5 percent", ["1,000", "men", "in", "the", "1960s", ";", "3.5", "percent"]),
    ],
)
def test_abbreviations_and_numbers(text: str, words: list[str]) -> None:
    assert tokenize(text) == words


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('He said "hi there" to me', ["he", "said", "``", "hi", "there", "''", "to", "me"]),
        ("“Curly” quotes", ["``", "curly", "''", "quotes"]),
        ("a – b — c", ["a", "--", "b", "--", "c"]),
        ("``Brown'' style", ["``", "brown", "''", "style"]),
    ],
)
def test_quotes_follow_brown_conventions(text: str, words: list[str]) -> None:
    assert tokenize(text) == words


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("It ended.", ["it", "ended", ".", EOS]),
        ("Really?! Yes", ["really", "?", "!", EOS, "yes"]),
        ('He said, "Go."', ["he", "said", ",", "``", "go", ".", "''", EOS]),  # <eos> after closing quote
        ("(He left.)", ["(", "he", "left", ".", ")", EOS]),
        ("no end", ["no", "end"]),
        ("Mr.", ["mr."]),  # an abbreviation's period ends no sentence
    ],
)
def test_eos_after_sentence_end(text: str, words: list[str]) -> None:
    assert tokenize(text) == words


def test_tokenize_chunk_and_whitespace() -> None:
    assert tokenize_chunk("Done.") == ["done", ".", EOS]
    assert tokenize("  a \t b\n\nc  ") == ["a", "b", "c"]
    assert tokenize("") == [] and tokenize("   ") == []


@pytest.mark.parametrize(
    ("text", "committed", "tail", "prefix"),
    [
        ("", [], [], ""),
        ("Hello wor", ["hello"], [], "wor"),
        ("Hello world ", ["hello", "world"], [], ""),
        ("end. Th", ["end", ".", EOS], [], "th"),
        ("the u.s", ["the"], [], "u.s"),  # a prefix of "u.s."
        ('he said "hi', ["he", "said"], ["``"], "hi"),
        ("I don'", ["i"], [], "don'"),
        ("word,", [], ["word", ","], ""),
        ("So.", [], ["so", ".", EOS], ""),
    ],
)
def test_split_text(text: str, committed: list[str], tail: list[str], prefix: str) -> None:
    s = split_text(text)
    assert (s.committed, s.tail, s.prefix) == (committed, tail, prefix)
    assert s.context == committed + tail
    if text and not text[-1].isspace():
        assert s.pending == text.split()[-1]
    else:
        assert s.pending == ""


# Text from a small alphabet that exercises every rule: letters, digits, marks, quotes,
# abbreviations, unicode quotes/dashes, and several kinds of whitespace.
_PIECES = st.sampled_from(
    ["a", "B", "z", "7", "0", ".", ",", "!", "?", "'", '"', "-", "&", "/", ":", "(", ")", "“", "”", "’", "—",
     "mr", "u.s", "gen", "don't", "...", "``", "''", "É", " ", " ", "  ", "\t", "\n", "\u00a0"]
)
_TEXT = st.lists(_PIECES, max_size=30).map("".join) | st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(_TEXT, _TEXT, st.sampled_from([" ", "\n", "\t", "  "]))
def test_tokenize_is_chunk_local(a: str, b: str, space: str) -> None:
    a = a + space  # a split point at whitespace
    assert tokenize(a) + tokenize(b) == tokenize(a + b)


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_committed_words_are_final(text: str) -> None:
    s = split_text(text)
    full = tokenize(text + " ")
    assert full[: len(s.committed)] == s.committed
    assert tokenize(text) == full
    # whatever is typed next, the committed words never change
    for more in ("x", ".", " y"):
        assert tokenize(text + more)[: len(s.committed)] == s.committed
    if text and not text[-1].isspace():
        assert s.committed + tokenize_chunk(s.pending) == full


# --------------------------------------------------------------------------- vocabulary


def test_vocab_build_orders_by_count_then_alphabet() -> None:
    counts = Counter({"b": 5, "a": 5, "c": 7, "d": 1, UNK: 9, EOS: 9})
    v = Vocab.build(counts)
    assert v.itos == [UNK, EOS, "c", "a", "b", "d"]
    assert (v.unk_id, v.eos_id) == (0, 1)


def test_vocab_min_count_and_max_size() -> None:
    counts = Counter({"a": 10, "b": 5, "c": 3, "d": 2, "e": 1})
    assert Vocab.build(counts, min_count=3).itos == [UNK, EOS, "a", "b", "c"]
    assert Vocab.build(counts, min_count=1, max_size=4).itos == [UNK, EOS, "a", "b"]
    assert Vocab.build(counts, min_count=1, max_size=1).itos == [UNK, EOS]


def test_vocab_save_load_round_trip(tmp_path: Path) -> None:
    v = Vocab.build(Counter("the cat sat on the mat , don't u.s. é".split()))
    path = tmp_path / "vocab.txt"
    v.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == v.itos and lines[:2] == [UNK, EOS]
    loaded = Vocab.load(path)
    assert loaded.itos == v.itos and len(loaded) == len(v)
    assert loaded.stoi == v.stoi


def test_vocab_encode_unknown_and_decode() -> None:
    v = Vocab([UNK, EOS, "the", "cat"])
    assert v.encode(["the", "dog", EOS, "cat"]) == [2, 0, 1, 3]
    assert v.decode([3, 0, 1]) == ["cat", UNK, EOS]
    assert v.is_special(UNK) and v.is_special(EOS) and not v.is_special("the")


def test_vocab_rejects_bad_word_lists() -> None:
    with pytest.raises(ValueError, match="start with"):
        Vocab(["the", UNK, EOS])
    with pytest.raises(ValueError, match="duplicate"):
        Vocab([UNK, EOS, "a", "a"])
