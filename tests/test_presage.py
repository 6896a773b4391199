"""The presage comparison (training/presage.py) types exactly the words the model's keystroke
simulation types (training/cache_eval.py), on a small Brown-format corpus made here; the run of
Debian's presage itself needs the package and is skipped without it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training.cache_eval import typed_positions
from training.data import split_documents
from training.presage import MODES, SYSTEM_CONFIG, PresageError, config, presage_ksr, typed_text

SENTENCES = [
    "Vincent/np G./np Ierulli/np has/hvz been/ben appointed/vbn ./.",
    "He/pps said/vbd 2/cd words/nns ,/, then/rb left/vbd ./.",
    "The/at jury/nn said/vbd it/pps ``/`` deserves/vbz ''/'' praise/nn ./.",
]


def brown(root: Path) -> Path:
    """Twenty Brown-format files: ``ca10`` and ``ca20`` (indices 9, 19) are the test split."""
    root.mkdir()
    for i in range(1, 21):
        (root / f"ca{i:02d}").write_text("\n\n".join("\t" + s for s in SENTENCES * 2) + "\n")
    return root


@pytest.mark.parametrize("limit", [1, 5, 12, 1000])
def test_presage_types_the_words_of_the_model_simulation(tmp_path: Path, limit: int) -> None:
    corpus = brown(tmp_path / "brown")
    stream = [w for d in split_documents(corpus, "brown", "test") for w in d]
    expected = [stream[i + 1] for i in typed_positions(stream, limit=limit)]
    text, count = typed_text(corpus, "test", limit)
    assert text.split() == expected and count == len(expected)
    # the split's first word has no model row, so neither types it; "g." and "2" are not typed
    assert stream[:3] == ["vincent", "g.", "ierulli"] and expected[0] == "ierulli"
    # one sentence a line
    assert text.splitlines()[0].split() == ["ierulli", "has", "been", "appointed"][:limit]
    if limit >= 12:
        assert text.splitlines()[1].split() == ["he", "said", "words", "then", "left"]


def test_split_documents_reads_a_brown_directory_as_its_files_with_format_auto(tmp_path: Path) -> None:
    corpus = brown(tmp_path / "brown")
    docs = split_documents(corpus, "auto", "test")
    assert docs == split_documents(corpus, "brown", "test") and len(docs) == 2


@pytest.mark.skipif(not SYSTEM_CONFIG.exists(), reason="Debian's presage is not installed (/etc/presage.xml)")
def test_presage_configuration_switches_online_learning(tmp_path: Path) -> None:
    static = config(tmp_path / "db", tmp_path / "user.db", learning=False, suggestions=3)
    learning = config(tmp_path / "db", tmp_path / "user.db", learning=True, suggestions=3)
    assert "<SUGGESTIONS>3</SUGGESTIONS>" in static and "<SUGGESTIONS>3</SUGGESTIONS>" in learning
    assert "<ONLINE_LEARNING>no</ONLINE_LEARNING>" in static and "RecencyPredictor" not in static.split(
        "<PREDICTORS>")[1].split("</PREDICTORS>")[0]
    assert "DefaultRecencyPredictor" in learning and str(tmp_path / "user.db") in learning
    assert "<REPEAT_SUGGESTIONS>no</REPEAT_SUGGESTIONS>" in learning  # presage's default: rotation
    repeat = config(tmp_path / "db", tmp_path / "user.db", learning=True, rotate=False)
    assert "<REPEAT_SUGGESTIONS>yes</REPEAT_SUGGESTIONS>" in repeat


@pytest.mark.skipif(shutil.which("presage_simulator") is None or shutil.which("text2ngram") is None
                    or not SYSTEM_CONFIG.exists(), reason="Debian's presage is not installed")
def test_presage_ksr_runs_on_the_same_words(tmp_path: Path) -> None:
    corpus = brown(tmp_path / "brown")
    result = presage_ksr(corpus, tmp_path / "work", "test", 12)
    assert result["words"] == 12
    assert (tmp_path / "work" / "typed.txt").read_text() == typed_text(corpus, "test", 12)[0]
    for mode, (learning, rotate) in MODES.items():
        assert 0.0 <= result[mode]["ksr"] < 1.0
        assert result[mode]["learning"] is learning and result[mode]["rotation"] is rotate
    written = (tmp_path / "work" / "presage-static-repeat.xml").read_text()
    assert "<REPEAT_SUGGESTIONS>yes</REPEAT_SUGGESTIONS>" in written
    only = presage_ksr(corpus, tmp_path / "work", "test", 12, modes=["learning-repeat"])
    assert only["learning-repeat"] == result["learning-repeat"] and "static" not in only
    with pytest.raises(PresageError, match="unknown presage modes"):
        presage_ksr(corpus, tmp_path / "work", "test", 12, modes=["fast"])
