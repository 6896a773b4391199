"""Evaluation of a writer-adapted model: perplexity with the cache, and keystroke savings.

Both go through the service's own code (``service/engine/cache_lm.py`` for the mixture and the new
words, ``service/engine/suggest.py``'s ``select`` for the suggestions, with the blocklist and typo
corrections as the service's settings have them: both on by default), one position at a time, on a
split read as documents in order: the model's state is carried across the split as in ``eval`` and
the cache starts empty at each document, as a session would for each text.

**Keystroke savings rate** (KSR): a simulated user types each alphabetic word letter by letter and
picks it as soon as it is among the ``k`` suggestions (a pick costs one keystroke and inserts the
word and its space); a word never offered costs its letters and a space. KSR = 1 − keystrokes with
suggestions / (letters + spaces) without. Other tokens (punctuation, numbers, sentence ends) are
read as context but not typed. A suggestion counts when its model word is the typed word: the
words are compared in lowercase (the Brown-LM words are lowercased, and a suggestion's written
form, "John" or "States", is the same word), as presage's simulator runs with ``-i``.

Rows for every position come from the predict graph, with the split cut into ``lanes`` contiguous
segments stepped together one token at a time (batch = lanes), each segment starting from the
state the stream reaches there (found by one cheap pass of the predict graph), so every row equals
the one-stream evaluation's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nextword import artifact as A
from nextword.vocab import Vocab
from service.config import Settings
from service.engine.blocklist import blocked_ids, blocklist_path, read_blocklist
from service.engine.cache_lm import AdaptedRow, CacheParams, adapt, cache_distribution, first_use_rule
from service.engine.correct import Corrector
from service.engine.suggest import select
from service.engine.vocab_index import VocabIndex
from training.cache_fit import document_starts
from training.evaluate import _session, load_artifact


def cache_perplexity(ids: np.ndarray, lengths: Sequence[int], model_log_probs: np.ndarray,
                     params: CacheParams) -> dict[str, float]:
    """Perplexity over ``ids[1:]`` with the cache mixed in, position by position through the
    service's :func:`cache_distribution` (the cache sees only the current document's words)."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = document_starts(lengths)
    nll = 0.0
    for i in range(ids.size - 1):
        j = i + 1
        cache = cache_distribution(ids[max(starts[j], j - params.history) : j], params)
        p = (1.0 - cache.keep_out) * math.exp(float(model_log_probs[i]))
        at = int(np.searchsorted(cache.ids, ids[j]))
        if at < cache.ids.size and cache.ids[at] == ids[j]:
            p += float(cache.probs[at])
        nll -= math.log(p)
    n = ids.size - 1
    return {"nll": nll / n, "ppl": math.exp(nll / n), "tokens": n}


def stream_rows(model_dir: str | Path, ids: np.ndarray, wanted: np.ndarray, lanes: int = 64,
                threads: int | None = None, progress: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, log-probs after ids[: i + 1])`` for every position ``i`` in ``wanted`` (any order)."""
    model_dir = Path(model_dir)
    card, _ = load_artifact(model_dir)
    sess = _session(model_dir, card.graphs["predict"], threads)
    n = ids.size - 1  # positions 0 .. n-1 predict ids[1:]
    lanes = max(1, min(lanes, n))
    bounds = np.linspace(0, n, lanes + 1).astype(np.int64)
    names = list(card.state_names)
    shape = (card.num_layers, 1, card.hidden_size)
    state = {s: np.zeros(shape, np.float32) for s in names}
    starts: list[dict[str, np.ndarray]] = []
    outputs = [A.state_output(s) for s in names]
    for k in range(lanes):  # the state before each segment: one predict call per segment
        starts.append(state)
        a, b = bounds[k], bounds[k + 1]
        if k + 1 < lanes and b > a:
            feeds = {A.TOKENS: ids[None, a:b], A.LENGTHS: np.array([b - a]),
                     **{A.state_input(s): state[s] for s in names}}
            state = dict(zip(names, sess.run(outputs, feeds), strict=True))
    need = np.zeros(n, dtype=bool)
    need[wanted] = True
    lane_state = {s: np.concatenate([st[s] for st in starts], axis=1) for s in names}
    steps = int((bounds[1:] - bounds[:-1]).max())
    for t in tqdm(range(steps), desc="rows", disable=not progress, leave=False):
        pos = np.minimum(bounds[:-1] + t, n - 1)
        live = bounds[:-1] + t < bounds[1:]
        feeds = {A.TOKENS: ids[pos][:, None], A.LENGTHS: np.ones(lanes, np.int64),
                 **{A.state_input(s): lane_state[s] for s in names}}
        log_probs, *new = sess.run([A.LOG_PROBS, *outputs], feeds)
        lane_state = dict(zip(names, new, strict=True))
        for lane in np.flatnonzero(live & need[pos]):
            yield int(pos[lane]), log_probs[lane]


@dataclass(frozen=True)
class Suggester:
    """What the service's ``select`` reads of a loaded version (``service/engine/repository.py``):
    the vocabulary index with the blocklist, the correction index, and no casing (the simulated
    user's words are matched as model words)."""

    index: VocabIndex
    corrector: Corrector | None = None
    casing: None = None

    @classmethod
    def for_vocab(cls, vocab: Vocab, settings: Settings | None = None) -> Suggester:
        """As the repository builds it under ``settings`` (default: the environment's
        ``NEXTWORD_BLOCKLIST`` and ``NEXTWORD_CORRECTIONS``)."""
        s = settings or Settings()
        blocklist = read_blocklist(blocklist_path(s.blocklist))
        index = VocabIndex(vocab, blocked_ids(vocab, blocklist), blocklist)
        return cls(index, Corrector(index) if s.corrections else None)

    def describe(self) -> str:
        return (f"blocklist {'on' if self.index.blocked_words else 'off'}, typo corrections "
                f"{'on' if self.corrector is not None else 'off'}, words matched case-insensitively")


def keystrokes(suggester: Suggester, row: AdaptedRow, word: str, k: int = 3, rotate: bool = False) -> int:
    """Keystrokes to enter ``word`` and its space with ``k`` suggestions (see the module docstring).
    ``rotate``: words offered earlier for this word and passed over are left out afterwards (as a
    session with ``rotate`` does: ``service/sessions/manager.py``)."""
    passed: set[str] = set()
    for typed in range(len(word) + 1):
        exclude = frozenset(passed) if rotate else frozenset()
        candidates, _ = select(suggester, row, k, word[:typed], exclude=exclude)  # type: ignore[arg-type]
        offered = [c.word for c in candidates]
        if word in offered:
            return typed + 1
        if rotate:
            passed.update(offered)
    return len(word) + 1


@dataclass
class KsrCount:
    words: int = 0
    plain: int = 0  # letters + spaces without suggestions
    typed: int = 0  # keystrokes with suggestions

    def add(self, word: str, strokes: int) -> None:
        self.words += 1
        self.plain += len(word) + 1
        self.typed += strokes

    @property
    def ksr(self) -> float:
        return 1.0 - self.typed / self.plain if self.plain else 0.0

    def result(self) -> dict[str, float]:
        return {"ksr": self.ksr, "words": self.words, "keystrokes": self.typed, "characters": self.plain}


def typed_positions(words: Sequence[str], first: int = 0, limit: int | None = None) -> np.ndarray:
    """Positions ``i`` (0-based, predicting ``words[i + 1]``) whose next word is typed in the KSR
    simulation: alphabetic words, from word ``first`` on, at most ``limit`` of them."""
    out = [j - 1 for j in range(max(1, first), len(words)) if words[j].isalpha()]
    return np.asarray(out[:limit] if limit is not None else out, dtype=np.int64)


@dataclass
class KsrVariant:
    name: str
    params: CacheParams | None
    rotate: bool = False
    count: KsrCount = field(default_factory=KsrCount)
    head: KsrCount = field(default_factory=KsrCount)  # the first ``head`` typed words alone


def model_ksr(model_dir: str | Path, documents: Sequence[Sequence[str]], variants: Sequence[KsrVariant],
              k: int = 3, new_word_count: int = 2, limit: int | None = None, lanes: int = 64,
              threads: int | None = None, progress: bool = True, head: int = 0,
              suggester: Suggester | None = None, new_word_first_use: bool = True) -> None:
    """Fill each variant's keystroke count on the split (its first ``limit`` typed words), and
    its ``head`` count on the first ``head`` typed words. New words as the service offers them
    (``NEXTWORD_NEW_WORD_MIN_COUNT`` and ``NEXTWORD_NEW_WORD_FIRST_USE``)."""
    card, vocab = load_artifact(model_dir)
    first_use = first_use_rule(vocab, new_word_first_use)
    suggester = suggester or Suggester.for_vocab(vocab)
    words = [w for doc in documents for w in doc]
    ids = np.asarray(vocab.encode(words), dtype=np.int64)
    starts = document_starts([len(d) for d in documents])
    wanted = typed_positions(words, limit=limit)
    first = set(wanted[:head].tolist())
    history = max((v.params.history for v in variants if v.params is not None), default=0)
    for i, row in stream_rows(model_dir, ids, wanted, lanes, threads, progress):
        j = i + 1
        lo = max(int(starts[j]), j - history)
        adapted: dict[CacheParams | None, AdaptedRow] = {}
        for v in variants:
            if v.params not in adapted:
                adapted[v.params] = adapt(row, words[lo:j], ids[lo:j], v.params, vocab.unk_id, new_word_count,
                                          first_use)
            strokes = keystrokes(suggester, adapted[v.params], words[j], k, v.rotate)
            v.count.add(words[j], strokes)
            if i in first:
                v.head.add(words[j], strokes)


def ngram_ksr(model, vocab, documents: Sequence[Sequence[str]], k: int = 3, limit: int | None = None,
              batch: int = 256, head: int = 0, settings: Settings | None = None) -> tuple[KsrCount, KsrCount]:
    """The same simulation on a fitted :class:`training.ngram.KneserNey` (no cache): the count
    over the typed words and over the first ``head`` of them."""
    suggester = Suggester.for_vocab(vocab, settings)
    words = [w for doc in documents for w in doc]
    ids = np.asarray(vocab.encode(words), dtype=np.int64)
    wanted = typed_positions(words, limit=limit)
    ctx = model._stream_contexts(ids)
    count, first = KsrCount(), KsrCount()
    for s in range(0, wanted.size, batch):
        pos = wanted[s : s + batch]
        rows = np.log(model._distributions(ctx[pos + 1])).astype(np.float32)
        for n, (i, row) in enumerate(zip(pos, rows, strict=True)):
            strokes = keystrokes(suggester, AdaptedRow(row), words[i + 1], k)
            count.add(words[i + 1], strokes)
            if s + n < head:
                first.add(words[i + 1], strokes)
    return count, first


def evaluate_adapted(model_dir: str | Path, corpus: str | Path, corpus_format: str, splits: Sequence[str],
                     scored: dict[str, np.ndarray], *, cache: bool = True, ksr: bool = False, ksr_k: int = 3,
                     ksr_words: int | None = None, ngram_order: int | None = None, threads: int | None = None,
                     update_card: bool = False, ksr_head: int = 0) -> dict[str, dict]:
    """``nextword-train eval --cache/--ksr``: per split, perplexity with the model's fitted cache
    (from the model's own log-probabilities ``scored[split]``) and the keystroke savings of the
    model with and without the cache and rotation (and of a Kneser-Ney ``ngram_order`` model, when
    given), also over the first ``ksr_head`` typed words alone (the words ``nextword-train
    presage`` types); printed as it goes, returned, and with ``update_card`` stored under
    ``cache.evaluation`` in model.json."""
    import sys

    from training.data import build_vocab, load_corpus, split_documents

    card, vocab = load_artifact(model_dir)
    params = CacheParams.from_card(card.cache)
    kn = None  # the n-gram model, fitted once for every split
    out: dict[str, dict] = {}
    for split in splits:
        docs = split_documents(corpus, corpus_format, split)
        ids = np.asarray(vocab.encode([w for d in docs for w in d]), dtype=np.int64)
        row: dict = {}
        if cache:
            if params is None:
                print(f"{model_dir} has no fitted cache (run nextword-train fit-cache)", file=sys.stderr)
            else:
                lp = scored[split]
                row["ppl"] = float(np.exp(-lp.astype(np.float64).mean()))
                row["ppl_cache"] = cache_perplexity(ids, [len(d) for d in docs], lp, params)["ppl"]
                row["ppl_reduction"] = 1.0 - row["ppl_cache"] / row["ppl"]
                print(f"{split:<6} ppl {row['ppl']:.2f} -> {row['ppl_cache']:.2f} with the cache "
                      f"({100 * row['ppl_reduction']:.1f}% lower; cache reset at each of {len(docs)} documents)")
        if ksr:
            # the suggestions as the service makes them under its settings (environment)
            settings = Settings()
            suggester = Suggester.for_vocab(vocab, settings)
            print(f"{split:<6} KSR through the service's selection: {suggester.describe()}")
            variants = [KsrVariant("model", None), KsrVariant("model+rotation", None, rotate=True)]
            if params is not None and settings.adaptation and settings.cache_window_words > 0:
                served = params.limited(settings.cache_window_words)
                variants += [KsrVariant("model+cache", served), KsrVariant("model+cache+rotation", served, True)]
            model_ksr(model_dir, docs, variants, k=ksr_k, new_word_count=settings.new_word_min_count,
                      new_word_first_use=settings.new_word_first_use,
                      limit=ksr_words, threads=threads, head=ksr_head, suggester=suggester)
            counts = {v.name: v.count.result() for v in variants}
            head = {v.name: v.head.result() for v in variants if v.head.words}
            if ngram_order:
                if kn is None:
                    from training.ngram import KneserNey

                    train = load_corpus(corpus, corpus_format).train
                    kn_vocab = build_vocab(train)
                    kn = (KneserNey(ngram_order).fit(kn_vocab.encode(train), len(kn_vocab)), kn_vocab)
                whole, first = ngram_ksr(kn[0], kn[1], docs, ksr_k, ksr_words, head=ksr_head, settings=settings)
                counts[f"kn{ngram_order}"] = whole.result()
                if first.words:
                    head[f"kn{ngram_order}"] = first.result()
            for label, table in (("", counts), (f" first {ksr_head}", head)):
                for name, r in table.items():
                    print(f"{split:<6} KSR top-{ksr_k}{label} {name:<22} {100 * r['ksr']:6.2f}%  "
                          f"({r['keystrokes']} of {r['characters']} keystrokes, {r['words']} words)")
            row["ksr"] = counts
            if head:
                row["ksr_head"] = head
            row["ksr_k"] = ksr_k
            row["ksr_selection"] = suggester.describe()
        out[split] = row
    if update_card and out and params is not None:
        card = A.read_card(model_dir)
        card.cache["evaluation"] = {**card.cache.get("evaluation", {}), **out}
        A.write_card(model_dir, card)
    return out
