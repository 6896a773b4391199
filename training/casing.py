"""Casing statistics for a model version: counted from the training split of a cased corpus and
written beside the vocabulary through the artifact format (torch-free).

``nextword-train casing --model models/brown-lstm/3 --corpus ../shared/data/brown`` adds them to an
existing version; ``nextword-train export`` writes them with every new version it exports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nextword import artifact as A
from nextword.casing import CaseCounts, count_cased, write_casing
from nextword.vocab import Vocab
from training.data import cased_sentences


def corpus_casing(corpus: str | Path, fmt: str) -> CaseCounts:
    return count_cased(cased_sentences(corpus, fmt))


def write_casing_file(directory: Path, counts: CaseCounts, vocab: Vocab) -> str:
    """Write ``casing.tsv`` into a version directory being built; returns its name for the card."""
    write_casing(directory / A.CASING_FILE, counts, vocab.itos)
    return A.CASING_FILE


def add_casing(model_dir: str | Path, corpus: str | Path, fmt: str = "brown") -> Path:
    """Count casing in ``corpus`` and add it to an existing version (``model.json`` rewritten with
    the new file's checksum; the service reloads the version when it next scans)."""
    model_dir = Path(model_dir)
    card = A.read_card(model_dir)
    # Every other file must be intact; the casing file itself is being replaced (or was lost).
    others = dataclasses.replace(card, casing_file=None,
                                 files={n: h for n, h in card.files.items() if n != A.CASING_FILE})
    A.verify_files(model_dir, others)
    vocab = Vocab.load(model_dir / card.vocab_file)
    counts = corpus_casing(corpus, fmt)
    tmp = model_dir / f".{A.CASING_FILE}.tmp"
    write_casing(tmp, counts, vocab.itos)
    tmp.replace(model_dir / A.CASING_FILE)
    card.casing_file = A.CASING_FILE
    card.training["casing"] = {"corpus": str(corpus), "format": fmt, "split": "train"}
    A.write_card(model_dir, card)
    return model_dir / A.CASING_FILE
