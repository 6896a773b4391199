"""The model artifact: the one contract between training and serving (see ``models/README.md``).

A model version is a directory ``<repository>/<name>/<version>/`` holding ONNX graphs, the
vocabulary and ``model.json``. Training writes it with :func:`write_card`; the service reads it
with :func:`read_card` and :func:`verify_files`. Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "nextword-model/1"
CARD_FILE = "model.json"
VOCAB_FILE = "vocab.txt"
PREDICT_GRAPH = "predict.onnx"
SCORE_GRAPH = "score.onnx"
PREDICT_INT8_GRAPH = "predict.int8.onnx"
WEIGHTS_FILE = "weights.bin"  # external initializers shared by the graphs
CASING_FILE = "casing.tsv"  # optional: how each word is written (nextword/casing.py)
TOKENIZER = "nextword-words/1"

# Graph tensor names. State tensors are "state_<name>" in and "next_state_<name>" out, each
# shaped [num_layers, batch, hidden_size].
TOKENS = "tokens"  # int64 [batch, time], right-padded
LENGTHS = "lengths"  # int64 [batch], each >= 1
TARGETS = "targets"  # int64 [batch, time] (score graph only)
LOG_PROBS = "log_probs"  # float32 [batch, vocab] at each row's last valid position
TARGET_LOG_PROBS = "target_log_probs"  # float32 [batch, time] (score graph), 0 on padding
TARGET_RANKS = "target_ranks"  # int64 [batch, time]: words scored strictly above the target

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class ArtifactError(Exception):
    """A model directory that does not satisfy the contract."""


def state_input(name: str) -> str:
    return f"state_{name}"


def state_output(name: str) -> str:
    return f"next_state_{name}"


@dataclass
class ModelCard:
    """Everything ``model.json`` says about one model version."""

    name: str
    version: int
    cell: str
    num_layers: int
    embedding_size: int
    hidden_size: int
    vocab_size: int
    state_names: list[str]
    graphs: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)
    data_files: list[str] = field(default_factory=list)  # external weights the graphs read
    tied: bool = False
    zoneout: float = 0.0
    weights_dtype: str = "float32"
    special_tokens: dict[str, str] = field(default_factory=lambda: {"unk": "<unk>", "eos": "<eos>"})
    tokenizer: str = TOKENIZER
    vocab_file: str = VOCAB_FILE
    casing_file: str | None = None  # None: suggestions stay the lowercase model words
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # The fitted cache language model (service/engine/cache_lm.py); {} = none, serve unmixed.
    cache: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if data.get("format") != FORMAT:
            raise ArtifactError(f"model.json format is {data.get('format')!r}, expected {FORMAT!r}")
        known = set(cls.__dataclass_fields__)
        try:
            card = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ArtifactError(f"model.json is missing fields: {exc}") from exc
        if card.tokenizer != TOKENIZER:
            raise ArtifactError(f"tokenizer {card.tokenizer!r} is not {TOKENIZER!r}")
        if "predict" not in card.graphs:
            raise ArtifactError("model.json names no 'predict' graph")
        return card


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listed_files(card: ModelCard) -> set[str]:
    """Every file the card refers to (each must have a checksum)."""
    return {*card.graphs.values(), *card.data_files, card.vocab_file, *([card.casing_file] if card.casing_file else [])}


def write_card(directory: str | Path, card: ModelCard) -> Path:
    """Checksum every file the card refers to and write ``model.json`` next to them.

    The card is written to a temporary name and renamed into place, so a watcher rereading a
    version that gains a file (``nextword-train casing``) never reads half a card."""
    directory = Path(directory)
    card.files = {n: sha256_file(directory / n) for n in sorted(listed_files(card))}
    path = directory / CARD_FILE
    tmp = directory / f".{CARD_FILE}.tmp"
    tmp.write_text(card.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def read_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:  # messages name files relative to the version (they reach clients)
        raise ArtifactError(f"{CARD_FILE} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{CARD_FILE} is not valid JSON: {exc}") from exc
    return ModelCard.from_dict(data)


def verify_files(directory: str | Path, card: ModelCard) -> None:
    """Raise :class:`ArtifactError` unless every listed file exists with its recorded sha256."""
    directory = Path(directory)
    needed = listed_files(card)
    missing = needed - set(card.files)
    if missing:
        raise ArtifactError(f"model.json has no checksum for {sorted(missing)}")
    for name, expected in card.files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{name} checksum mismatch: {actual[:12]} != {expected[:12]}")


VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,17})$")  # ASCII digits only: str.isdigit() also takes "²" and "٣"


def version_dirs(repository: str | Path, skipped: list[Path] | None = None) -> dict[str, dict[int, Path]]:
    """``{name: {version: path}}`` for every ``<name>/<integer version>/`` in a repository.

    A version is a directory named with ASCII digits in canonical form (no leading zeros, at most
    18 digits, so names and numbers map one to one). It is listed whether or not it has a
    ``model.json``: a loader reports a missing card instead of ignoring the directory. Anything
    else under a model directory (hidden temporaries, ``²``, ``007``, files) is not a version and
    never breaks a scan; directories among those are appended to ``skipped`` when given."""
    found: dict[str, dict[int, Path]] = {}
    root = Path(repository)
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name)):
        for vdir in sorted(model_dir.iterdir()):
            if not vdir.is_dir():
                continue
            if VERSION_RE.match(vdir.name):
                found.setdefault(model_dir.name, {})[int(vdir.name)] = vdir
            elif skipped is not None and not vdir.name.startswith("."):
                skipped.append(vdir)
    return found
