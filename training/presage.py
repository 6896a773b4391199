"""Keystroke savings of Debian's ``presage`` (a smoothed trigram plus, with online learning, a
user n-gram model learnt while typing and a recency predictor) on the same words as
``nextword-train eval --ksr``: the first N alphabetic words of a Brown-LM split (the very same
words, one sentence a line), typed by ``presage_simulator`` with 3 suggestions. Its n-gram
database is built by ``text2ngram`` from the Brown-LM training split (``-n 1..3 -l -f sqlite``).

Needs the ``presage`` package (``apt-get install presage``: ``text2ngram``, ``presage_simulator``,
``/etc/presage.xml``). The simulator counts every character of its text file as a keystroke
without prediction (letters, and the space or newline after each word), as the model's KSR does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from nextword.text import EOS
from training.data import brown_files, brown_sentences, brown_split_of, split_documents

SYSTEM_CONFIG = Path("/etc/presage.xml")
ALL_PREDICTORS = ("DefaultAbbreviationExpansionPredictor DefaultSmoothedNgramPredictor UserSmoothedNgramPredictor "
                  "DefaultRecencyPredictor")


class PresageError(RuntimeError):
    """presage is not installed or its simulator gave no KSR."""


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise PresageError(f"{tool} not found: install Debian's presage (apt-get install presage)")
    return path


def build_database(corpus: str | Path, work: Path) -> Path:
    """The 1-, 2- and 3-gram sqlite database of the Brown-LM training split (built once per work dir)."""
    db = work / "brown-train.db"
    if db.exists():
        return db
    text = work / "train.txt"
    with text.open("w", encoding="utf-8") as out:
        for i, path in enumerate(brown_files(corpus)):
            if brown_split_of(i) == "train":
                for sentence in brown_sentences(path):
                    out.write(" ".join(sentence) + "\n")
    partial = work / "brown-train.db.part"
    partial.unlink(missing_ok=True)
    for n in (1, 2, 3):
        subprocess.run([_need("text2ngram"), "-n", str(n), "-l", "-f", "sqlite", "-o", str(partial), "-a", str(text)],
                       check=True, stdout=subprocess.DEVNULL)
    partial.rename(db)
    return db


def typed_text(corpus: str | Path, split: str, words: int) -> tuple[str, int]:
    """The words ``nextword-train eval --ksr --ksr-words N`` types (:func:`typed_positions`: the
    split's alphabetic words but its very first, which the model has no row for), at most
    ``words`` of them, one sentence a line."""
    from training.cache_eval import typed_positions

    stream = [w for doc in split_documents(corpus, "brown", split) for w in doc]
    typed = set((typed_positions(stream, limit=words) + 1).tolist())
    lines: list[str] = []
    sentence: list[str] = []
    for j, w in enumerate(stream[: max(typed, default=0) + 1]):
        if j in typed:
            sentence.append(w)
        if w == EOS and sentence:
            lines.append(" ".join(sentence))
            sentence = []
    if sentence:
        lines.append(" ".join(sentence))
    return "\n".join(lines) + "\n", len(typed)


def config(db: Path, user_db: Path, learning: bool, suggestions: int = 3, rotate: bool = True) -> str:
    """``/etc/presage.xml`` with our database, ``suggestions`` per prediction, online learning
    (the user n-gram and recency predictors) on or off, and ``REPEAT_SUGGESTIONS`` = no (presage's
    default: a suggestion passed over is not offered again for the same word, our rotation) or yes."""
    xml = SYSTEM_CONFIG.read_text(encoding="utf-8")
    xml = re.sub(r"<SUGGESTIONS>\d+</SUGGESTIONS>", f"<SUGGESTIONS>{suggestions}</SUGGESTIONS>", xml)
    xml = re.sub(r"<REPEAT_SUGGESTIONS>\w+</REPEAT_SUGGESTIONS>",
                 f"<REPEAT_SUGGESTIONS>{'no' if rotate else 'yes'}</REPEAT_SUGGESTIONS>", xml)
    xml = xml.replace("/usr/share/presage/database_en.db", str(db)).replace("${HOME}/.presage/lm.db", str(user_db))
    if not learning:
        xml = xml.replace(f"<PREDICTORS>{ALL_PREDICTORS}</PREDICTORS>", "<PREDICTORS>DefaultSmoothedNgramPredictor"
                          "</PREDICTORS>")
        xml = xml.replace("<ONLINE_LEARNING>yes</ONLINE_LEARNING>", "<ONLINE_LEARNING>no</ONLINE_LEARNING>")
    return xml


# result keys: (online learning, rotation)
MODES = {"static": (False, True), "learning": (True, True), "static-repeat": (False, False),
         "learning-repeat": (True, False)}


def presage_ksr(corpus: str | Path, work: str | Path, split: str = "test", words: int = 1889,
                suggestions: int = 3, modes: Sequence[str] = tuple(MODES)) -> dict:
    """KSR of presage on the split's first ``words`` typed words, for each of :data:`MODES`: online
    learning off or on, each with presage's default ``REPEAT_SUGGESTIONS`` = no (rotation: compare
    with our ``+rotation`` rows) and with it = yes (``-repeat``: compare with the rows without);
    ``modes``: only those."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise PresageError(f"unknown presage modes {sorted(unknown)}; known: {', '.join(MODES)}")
    simulator = _need("presage_simulator")
    if not SYSTEM_CONFIG.exists():
        raise PresageError(f"{SYSTEM_CONFIG} not found: install Debian's presage")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    db = build_database(corpus, work)
    text, count = typed_text(corpus, split, words)
    (work / "typed.txt").write_text(text, encoding="utf-8")
    out: dict = {"words": count, "suggestions": suggestions, "split": split}
    for mode in modes:
        learning, rotate = MODES[mode]
        user_db = work / "user.db"
        user_db.unlink(missing_ok=True)  # online learning starts from nothing, like a new user
        conf = work / f"presage-{mode}.xml"
        conf.write_text(config(db, user_db, learning, suggestions, rotate), encoding="utf-8")
        run = subprocess.run([simulator, "-i", "-q", "-c", str(conf), str(work / "typed.txt")],
                             capture_output=True, text=True, check=True)
        found = re.search(r"KSR:\s*([0-9.]+)", run.stdout)
        if found is None:
            raise PresageError(f"presage_simulator printed no KSR: {run.stdout[-500:]}")
        counts = {k: int(v) for k, v in re.findall(r"^(ki|ks|kn) : (\d+)", run.stdout, re.M)}
        out[mode] = {"ksr": float(found.group(1)) / 100, "rotation": rotate, "learning": learning, **counts}
    return out
