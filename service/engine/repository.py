"""The model repository as the service sees it: every version loaded, verified and self-checked.

A version goes live only after: ``model.json`` parses and matches its path, every file matches its
sha256, the vocabulary matches the card, onnxruntime loads both graphs with the tensors the card
implies, and a self-check inference gives sane numbers (finite, normalised, padding-invariant,
predict and score graphs agreeing). A version that fails any step is recorded as ``failed`` with
the error (log, ``nextword_model_loads_total{result="failure"}``, ``/v1/models``); whatever was
serving keeps serving.

Swaps are copy-on-write: a scan builds a new ``{name: {version: LoadedVersion}}`` map and
publishes it with one assignment, so request handlers read it without locks. A version removed
from the map keeps its batcher until the queue drains, so requests already holding it finish; a
request that looked it up a moment before it closed gets :class:`BatcherClosedError` and looks
up again (see ``Predictor``).

The newest loaded version of a model serves by default; every loaded version can be asked for.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nextword import artifact as A
from nextword.casing import CasingError
from nextword.text import EOS, UNK
from nextword.vocab import Vocab
from service import metrics
from service.config import Settings
from service.engine.batcher import Batcher
from service.engine.blocklist import blocked_ids, blocklist_path, read_blocklist
from service.engine.cache_lm import CacheParams
from service.engine.correct import Corrector
from service.engine.errors import (
    ModelLoadError,
    ModelNotFoundError,
    NoModelLoadedError,
    VersionNotFoundError,
)
from service.engine.runtime import DeviceChoice, ModelRuntime, choose_device
from service.engine.truecase import TrueCase
from service.engine.vocab_index import VocabIndex

log = logging.getLogger("service.engine.repository")

SERVING = "serving"
LOADED = "loaded"
FAILED = "failed"

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: Path) -> Fingerprint:
    """Names, sizes and mtimes of a version's files: cheap to poll, and it changes whenever a
    version is rewritten or a broken file is fixed, which is when a retry makes sense."""
    entries = []
    try:
        for path in directory.iterdir():
            if path.is_file():
                st = path.stat()
                entries.append((path.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(entries))


@dataclass(eq=False)
class LoadedVersion:
    """A live model version: card, vocabulary, onnxruntime sessions and its batcher."""

    name: str
    version: int
    path: Path
    card: A.ModelCard
    vocab: Vocab
    index: VocabIndex
    runtime: ModelRuntime
    batcher: Batcher
    fingerprint: Fingerprint
    cache: CacheParams | None = None  # the fitted cache language model (model.json "cache"), if any
    loaded_at: float = field(default_factory=time.time)
    casing: TrueCase | None = None  # None: suggestions are written as the model words
    corrector: Corrector | None = None  # None: corrections are off (NEXTWORD_CORRECTIONS)

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def eos_id(self) -> int:
        return self.vocab.eos_id

    def zero_state(self) -> dict[str, np.ndarray]:
        """The state of a fresh context, one ``[layers, hidden]`` array per state name."""
        shape = (self.card.num_layers, self.card.hidden_size)
        return {name: np.zeros(shape, np.float32) for name in self.card.state_names}


@dataclass
class Failure:
    name: str
    version: int
    error: str
    fingerprint: Fingerprint
    at: float = field(default_factory=time.time)
    cell: str = "unknown"


@dataclass
class VersionInfo:
    """Status of one version, as ``/v1/models`` reports it."""

    name: str
    version: int
    status: str
    error: str | None = None
    device: str | None = None
    device_note: str | None = None
    cell: str | None = None
    vocab_size: int | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    embedding_size: int | None = None
    weights_dtype: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    loaded_at: float | None = None


@dataclass
class ScanReport:
    loaded: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    unloaded: list[tuple[str, int]] = field(default_factory=list)


class ModelRepository:
    def __init__(self, settings: Settings, device: DeviceChoice | None = None) -> None:
        self.settings = settings
        self.root = Path(settings.model_repository)
        self.device = device or choose_device(settings.device)
        self.blocklist = read_blocklist(blocklist_path(settings.blocklist))
        self._versions: dict[str, dict[int, LoadedVersion]] = {}
        self._failures: dict[tuple[str, int], Failure] = {}
        self._scan_lock = threading.Lock()
        self._skipped_logged: set[Path] = set()
        self._info_labels: set[InfoLabels] = set()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.last_scan: float | None = None

    # --- lookups (event loop; lock-free reads of the published map) ----------------------------

    @property
    def ready(self) -> bool:
        return any(self._versions.values())

    def names(self) -> list[str]:
        return sorted(set(self._versions) | {name for name, _ in self._failures})

    def default_name(self) -> str:
        versions = self._versions
        preferred = self.settings.default_model
        if preferred and versions.get(preferred):
            return preferred
        for name in sorted(versions):
            if versions[name]:
                return name
        raise NoModelLoadedError()

    def resolve(self, name: str | None = None, version: int | None = None) -> LoadedVersion:
        """The version that answers a request: the named one, or the model's newest."""
        versions = self._versions
        name = name or self.default_name()
        loaded = versions.get(name)
        if not loaded:
            raise ModelNotFoundError(name)
        if version is None:
            return loaded[max(loaded)]
        found = loaded.get(version)
        if found is None:
            failure = self._failures.get((name, version))
            raise VersionNotFoundError(name, version, f"it failed to load: {failure.error}" if failure else None)
        return found

    def serving(self) -> dict[str, LoadedVersion]:
        return {name: vs[max(vs)] for name, vs in self._versions.items() if vs}

    def status(self, name: str | None = None) -> dict[str, list[VersionInfo]]:
        """``{model: [VersionInfo, newest first]}`` for one or every model (failures included)."""
        versions = self._versions
        failures = dict(self._failures)
        names = [name] if name is not None else self.names()
        out: dict[str, list[VersionInfo]] = {}
        for model in names:
            infos: dict[int, VersionInfo] = {}
            loaded = versions.get(model, {})
            newest = max(loaded) if loaded else None
            for v, lv in loaded.items():
                card = lv.card
                infos[v] = VersionInfo(
                    name=model, version=v, status=SERVING if v == newest else LOADED,
                    device=lv.device, device_note=lv.runtime.device_note, cell=card.cell,
                    vocab_size=card.vocab_size, num_layers=card.num_layers, hidden_size=card.hidden_size,
                    embedding_size=card.embedding_size, weights_dtype=card.weights_dtype,
                    metrics=card.metrics, created=card.created or None, loaded_at=lv.loaded_at,
                )
            for (fname, v), failure in failures.items():
                if fname != model:
                    continue
                if v in infos:  # a rewrite of a live version failed: the old one still answers
                    infos[v].error = failure.error
                else:
                    infos[v] = VersionInfo(name=model, version=v, status=FAILED, error=failure.error, cell=failure.cell)
            if infos or name is None:
                out[model] = [infos[v] for v in sorted(infos, reverse=True)]
        if name is not None and not out.get(name):
            raise ModelNotFoundError(name)
        return out

    # --- loading ------------------------------------------------------------------------------

    def scan(self, force: bool = False) -> ScanReport:
        """Bring the loaded set in line with the directory: load new or changed versions, unload
        removed ones. ``force`` retries versions that failed before even if unchanged (the
        explicit reload call); the poller only retries when a failed version's files change."""
        with self._scan_lock:
            report = ScanReport()
            current = self._versions
            updated = {name: dict(vs) for name, vs in current.items()}
            to_close: list[LoadedVersion] = []
            skipped: list[Path] = []
            on_disk = A.version_dirs(self.root, skipped)
            for path in skipped:
                if path not in self._skipped_logged:
                    self._skipped_logged.add(path)
                    log.warning(
                        "%s/%s is not a version directory (versions are named 0, 1, 2, ... in ASCII digits): skipped",
                        path.parent.name, path.name,
                    )
            if not self.root.is_dir():
                log.warning("model repository %s does not exist (yet)", self.root)
            for name, versions in on_disk.items():
                for version, path in sorted(versions.items()):
                    fp = fingerprint(path)
                    live = current.get(name, {}).get(version)
                    if live is not None and live.fingerprint == fp:
                        continue
                    failure = self._failures.get((name, version))
                    if failure is not None and failure.fingerprint == fp and not force:
                        continue
                    try:
                        loaded = self.load_version(name, version, path, fp)
                    except Exception as exc:
                        error = _public_error(str(exc) or type(exc).__name__, (path, self.root), f"{name}/{version}")
                        cell = _card_cell(path)
                        self._failures[(name, version)] = Failure(name, version, error, fp, cell=cell)
                        metrics.MODEL_LOADS.labels(name, "failure").inc()
                        report.failed.append((name, version, error))
                        keeps = "the previous version keeps serving" if current.get(name) else "nothing to serve"
                        log.error("model %s version %s failed to load (%s): %s", name, version, keeps, error)
                        continue
                    metrics.MODEL_LOADS.labels(name, "success").inc()
                    self._failures.pop((name, version), None)
                    updated.setdefault(name, {})[version] = loaded
                    report.loaded.append((name, version))
                    if live is not None:
                        to_close.append(live)
                    log.info(
                        "model %s version %s loaded (cell %s, %d words, device %s)",
                        name, version, loaded.card.cell, loaded.card.vocab_size, loaded.device,
                    )
            for name, versions in current.items():
                for version, live in versions.items():
                    if version not in on_disk.get(name, {}):
                        del updated[name][version]
                        to_close.append(live)
                        report.unloaded.append((name, version))
                        log.info("model %s version %s removed from the repository: unloaded", name, version)
            for key in [k for k in self._failures if k[1] not in on_disk.get(k[0], {})]:
                del self._failures[key]
            self._versions = {name: vs for name, vs in updated.items() if vs}  # the one publishing write
            self.last_scan = time.time()
            self._publish_info()
        for old in to_close:
            # Drain in the background: requests already queued on the old version still finish.
            threading.Thread(target=old.batcher.close, kwargs={"drain": True}, daemon=True).start()
        return report

    def load_version(self, name: str, version: int, path: Path, fp: Fingerprint | None = None) -> LoadedVersion:
        """Load, verify and self-check one version; raises on any problem (nothing goes live)."""
        card = A.read_card(path)
        if card.name != name or card.version != version:
            raise ModelLoadError(f"model.json says {card.name}/{card.version}, directory is {name}/{version}")
        A.verify_files(path, card)
        vocab = Vocab.load(path / card.vocab_file)
        if len(vocab) != card.vocab_size:
            raise ModelLoadError(f"{card.vocab_file} has {len(vocab)} words, model.json says {card.vocab_size}")
        specials = card.special_tokens
        if specials.get("unk") != UNK or specials.get("eos") != EOS:
            raise ModelLoadError(f"unsupported special tokens {specials}")
        try:
            cache = CacheParams.from_card(card.cache)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"model.json cache section: {exc}") from exc
        casing = None
        if card.casing_file:
            try:
                casing = TrueCase.load(path / card.casing_file, vocab)
            except CasingError as exc:
                raise ModelLoadError(str(exc)) from exc
        index = VocabIndex(vocab, blocked_ids(vocab, self.blocklist), self.blocklist)
        runtime = ModelRuntime.load(
            path, card, self.device, self.settings.intra_op_threads, self.settings.intra_op_spinning,
            workers=self.settings.inference_workers, spinning_long=self.settings.long_prompt_spinning,
        )
        self_check(runtime, vocab)
        if runtime.device_note:
            log.warning("%s v%s: %s", name, version, runtime.device_note)
        s = self.settings
        if cache is not None and s.adaptation and s.new_word_first_use:
            vocab.prepare_near_word()
        batcher = Batcher(
            runtime, model=name, version=version, max_batch_size=s.max_batch_size,
            max_queue_delay=s.max_queue_delay_seconds, max_batch_tokens=s.max_batch_tokens,
            max_score_tokens=s.score_chunk_tokens,
            queue_capacity=s.queue_capacity, timeout=s.request_timeout_seconds, workers=s.inference_workers,
        ).start()
        return LoadedVersion(
            name=name, version=version, path=path, card=card, vocab=vocab, index=index,
            runtime=runtime, batcher=batcher, fingerprint=fp if fp is not None else fingerprint(path), cache=cache,
            casing=casing, corrector=Corrector(index) if s.corrections else None,
        )

    def _publish_info(self) -> None:
        """One ``nextword_model_version_info`` series per known version; stale series removed."""
        labels: set[InfoLabels] = set()
        for name, infos in self.status().items():
            for info in infos:
                labels.add((name, str(info.version), info.cell or "unknown", info.device or "none", info.status))
        _retain_info(labels - self._info_labels)
        _release_info(self._info_labels - labels)
        self._info_labels = labels

    # --- watching -----------------------------------------------------------------------------

    def start_watching(self, interval: float | None = None) -> None:
        """Poll the directory every ``interval`` seconds (0: never) on a daemon thread."""
        interval = self.settings.reload_interval_seconds if interval is None else interval
        if interval <= 0 or self._watcher is not None:
            return
        self._stop.clear()

        def watch() -> None:
            while not self._stop.wait(interval):
                try:
                    self.scan()
                except Exception:  # a scan bug must not stop the watcher
                    log.exception("repository scan failed")

        self._watcher = threading.Thread(target=watch, name="repository-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop watching and stop every batcher (queued work is drained first)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
        with self._scan_lock:
            versions, self._versions = self._versions, {}
            _release_info(self._info_labels)
            self._info_labels = set()
        for vs in versions.values():
            for lv in vs.values():
                lv.batcher.close(drain=True, timeout=5)


# The info gauge is process-wide while repositories are per app: several apps in one process
# (tests, embedding) may publish the same series, so each series lives while any of them has it.
InfoLabels = tuple[str, str, str, str, str]
_info_refs: dict[InfoLabels, int] = {}
_info_lock = threading.Lock()


def _retain_info(labels: set[InfoLabels]) -> None:
    with _info_lock:
        for lbl in labels:
            _info_refs[lbl] = _info_refs.get(lbl, 0) + 1
            metrics.MODEL_VERSION_INFO.labels(*lbl).set(1)


def _release_info(labels: set[InfoLabels]) -> None:
    with _info_lock:
        for lbl in labels:
            _info_refs[lbl] = _info_refs.get(lbl, 1) - 1
            if _info_refs[lbl] <= 0:
                del _info_refs[lbl]
                with contextlib.suppress(KeyError):
                    metrics.MODEL_VERSION_INFO.remove(*lbl)


def _public_error(error: str, paths: tuple[Path, ...], label: str) -> str:
    """A load error as clients may see it (``/v1/models``, reload reports): onnxruntime and the OS
    name absolute paths, which say how the host is laid out; the version is named instead."""
    for path in paths:
        for form in {str(path.resolve()), str(path.absolute()), str(path)}:
            error = error.replace(form + "/", label + "/").replace(form, label)
    return error


def _card_cell(path: Path) -> str:
    try:
        return A.read_card(path).cell
    except Exception:
        return "unknown"


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def self_check(runtime: ModelRuntime, vocab: Vocab, tolerance: float = 1e-3) -> None:
    """A tiny inference that must make sense before a version may serve: a ragged 2-row predict
    batch (finite, each row a distribution, padding-invariant) and the score graph agreeing with
    the predict graph on the same continuation."""
    V = len(vocab)
    eos = vocab.eos_id
    words = [i % V for i in (2, 3, 4)] if V > 2 else [eos, eos, eos]
    tokens = np.array([[eos, 0, 0, 0], [eos, *words]], dtype=np.int64)
    lengths = np.array([1, 4], dtype=np.int64)
    try:
        feeds = {A.TOKENS: tokens, A.LENGTHS: lengths, **_states(runtime, 2)}
        (log_probs,), _ = runtime.run("predict", feeds, [A.LOG_PROBS])
        alone = {A.TOKENS: tokens[:1, :1], A.LENGTHS: lengths[:1], **_states(runtime, 1)}
        (single,), _ = runtime.run("predict", alone, [A.LOG_PROBS])
        score_feeds = {
            A.TOKENS: tokens[1:], A.LENGTHS: lengths[1:], A.TARGETS: np.array([[*words, eos]], dtype=np.int64),
            **_states(runtime, 1),
        }
        (target_lp, ranks), _ = runtime.run("score", score_feeds, [A.TARGET_LOG_PROBS, A.TARGET_RANKS])
    except Exception as exc:
        raise ModelLoadError(f"self-check inference failed: {exc}") from exc
    problems = []
    if log_probs.shape != (2, V):
        problems.append(f"log_probs shape {log_probs.shape} != (2, {V})")
    elif not np.isfinite(log_probs).all():
        problems.append("log_probs are not finite")
    else:
        total = np.abs(_logsumexp(log_probs.astype(np.float64))).max()
        if total > tolerance:
            problems.append(f"log_probs do not sum to 1 (|log Σp| = {total:.2e})")
        padding = float(np.abs(single[0] - log_probs[0]).max())
        if padding > tolerance:
            problems.append(f"padding changes results by {padding:.2e}")
        agree = abs(float(target_lp[0, -1]) - float(log_probs[1, eos]))
        if not np.isfinite(target_lp).all() or agree > tolerance:
            problems.append(f"score graph disagrees with predict graph by {agree:.2e}")
        # Ranks count words strictly above the target: allow words within tolerance either way.
        target = log_probs[1, eos]
        low, high = int((log_probs[1] > target + tolerance).sum()), int((log_probs[1] > target - tolerance).sum())
        if not low <= int(ranks[0, -1]) <= high:
            problems.append(f"score graph rank {int(ranks[0, -1])} is not in [{low}, {high}]")
    if problems:
        raise ModelLoadError("self-check failed: " + "; ".join(problems))


def _states(runtime: ModelRuntime, batch: int) -> dict[str, np.ndarray]:
    return {A.state_input(name): value for name, value in runtime.zero_state(batch).items()}
