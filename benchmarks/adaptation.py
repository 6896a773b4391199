"""Section ``adaptation``: does a session that learns its writer save keystrokes on text of a
domain the model never saw?

Brown (1961 prose) is the training domain; the held-out text here is the GNU GPL version 3, as
Debian ships it in every installation (``/usr/share/common-licenses/GPL-3``, base-files): legal and
software vocabulary ("licensee", "conveying", "object code") that Brown rarely or never has, and
that the text repeats. It is typed through the real service, one WebSocket session per arm, as a
keyboard would: the same simulated user as ``nextword-train eval --ksr`` (each alphabetic word
typed letter by letter, picked as soon as it is among the ``k`` suggestions; a pick costs one
keystroke and inserts the word and its space; punctuation and numbers are sent as context but not
counted), once with the session adapting (``learn=true``: the cache LM and new words) and once
incognito (``learn=false``). KSR = 1 − keystrokes with suggestions / (letters + spaces) without.
Both arms read the same text, so the difference is what adaptation gives out of domain.

The section also measures what learning costs a commit as a session grows (:func:`commit_cost`):
a word-completing update in sessions whose learned window is full, against the same in new
sessions, in one process through the real session manager and onnxruntime.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Row, log
from benchmarks.server import private_repository

TEXT = Path("/usr/share/common-licenses/GPL-3")
K = 3
_CHUNK = re.compile(r"([^\W\d_]+(?:'[^\W\d_]+)?)|(\S)")  # a word (inner apostrophe), or one other mark


def chunks(text: str, limit: int) -> list[tuple[str, bool]]:
    """The text as ``(piece, typed)`` in order: words (typed: alphabetic, as the KSR user types
    them) and single marks (sent, not counted), at most ``limit`` typed words. A piece followed by
    whitespace in the text ends with a space."""
    out: list[tuple[str, bool]] = []
    typed = 0
    for m in _CHUNK.finditer(text):
        piece = m.group(0)
        spaced = m.end() < len(text) and text[m.end()].isspace()
        word = m.group(1) is not None and piece.isalpha()
        if word:
            if typed == limit:
                break
            typed += 1
        out.append((piece + (" " if spaced else ""), word))
    return out


def type_text(url: str, pieces: list[tuple[str, bool]], learn: bool, model: str, version: int,
              k: int = K) -> dict[str, Any]:
    """Type ``pieces`` through one session stream; the keystroke count of the simulated user."""
    from websockets.sync.client import connect

    query = f"/v1/sessions/stream?k={k}&learn={'true' if learn else 'false'}&model={model}&version={version}"
    typed = plain = words = 0
    with connect(url.replace("http://", "ws://", 1) + query, compression=None, open_timeout=30,
                 max_size=2**20) as ws:
        hello = json.loads(ws.recv(timeout=30))
        if hello.get("type") != "session":
            raise RuntimeError(f"session stream refused: {hello}")
        seq = 0
        suggestions = [p["word"] for p in hello["predictions"]["predictions"]]

        def send(text: str | None = None, replace: str | None = None) -> list[str]:
            nonlocal seq
            message: dict[str, Any] = {"seq": seq}
            if text is not None:
                message["text"] = text
            if replace is not None:
                message["replace_pending"] = replace
            ws.send(json.dumps(message))
            seq += 1
            reply = json.loads(ws.recv(timeout=60))
            if reply.get("type") != "predictions":
                raise RuntimeError(f"update refused: {reply}")
            return [p["word"] for p in reply["predictions"]]

        for piece, is_word in pieces:
            if not is_word:
                suggestions = send(piece)
                continue
            word = piece.rstrip(" ")
            target, strokes = word.lower(), len(word) + 1
            for n in range(len(word) + 1):
                if n:
                    suggestions = send(word[n - 1])
                if target in suggestions:
                    strokes = n + 1
                    break
            # A pick writes the rest of the word; a word typed in full is already there.
            rest = word if strokes <= len(word) else None
            suggestions = send(piece[len(word):] or None, replace=rest)  # the space (if any) commits it
            words += 1
            typed += strokes
            plain += len(word) + 1
    return {"words": words, "keystrokes": typed, "characters": plain, "ksr": 1 - typed / plain if plain else 0.0}


def run_adaptation(ctx: Context) -> list[Row]:
    name = f"held-out domain (GNU GPL v3), KSR top-{K} through the session WebSocket, adapting vs incognito"
    if not TEXT.is_file():
        return [Row("adaptation", name, None, display="not measured",
                    note=f"{TEXT} is absent (Debian's base-files ships it)")]
    card = ctx.card
    text = TEXT.read_text(encoding="utf-8")
    pieces = chunks(text, ctx.pick(3000, 200))
    service = ctx.servers.service()
    results = {}
    for learn in (False, True):
        log(f"adaptation: typing {sum(w for _, w in pieces)} words of {TEXT.name}, learn={learn}")
        results[learn] = type_text(service.url, pieces, learn, card.name, card.version)
    on, off = results[True], results[False]
    gain = 100 * (on["ksr"] - off["ksr"])
    words = [piece.strip() for piece, typed in chunks(text, 6000) if typed]
    return [commit_cost(ctx, words), Row(
        "adaptation", name, gain, "points",
        display=f"{100 * on['ksr']:.2f}% vs {100 * off['ksr']:.2f}% (+{gain:.2f} points) over {on['words']:,} words",
        note="the cache LM and new words (learn=true) against the same session incognito (learn=false)",
        details={"adapting": on, "incognito": off, "text": str(TEXT), "k": K},
    )]


def commit_cost(ctx: Context, words: list[str]) -> Row:
    """Event-loop CPU of a word-completing update (``time.thread_time`` around
    ``SessionManager.update``; the model runs on the batcher's threads), in sessions whose learned
    window is full against new sessions, interleaved so both see the same machine."""
    from service.config import Settings
    from service.engine.core import Engine
    from service.sessions.manager import SessionManager

    name = "a word-completing update's event-loop CPU, session with a full learned window vs a new session"
    settings = Settings(model_repository=private_repository(ctx.model_dir, ctx.work_dir), device="cpu",
                        reload_interval_seconds=0, intra_op_threads=ctx.threads, log_level="warning",
                        session_sweep_interval_seconds=0)
    window = settings.cache_window_words + 2
    sessions = ctx.pick(8, 2)
    commits = ctx.pick(50, 10)  # per session and arm
    if len(words) < window + sessions * commits + 200:
        return Row("adaptation", name, None, display="not measured", note=f"the text has {len(words)} words")

    async def measure() -> dict[str, list[float]]:
        engine = Engine(settings)
        engine.start()
        manager = SessionManager(engine, settings)
        await manager.start()
        try:
            arms: dict[str, list[str]] = {"full": [], "new": []}
            for j in range(sessions):
                for arm in arms:
                    arms[arm].append((await manager.create(k=5)).record.id)
                start = (j * 97) % (len(words) - window - 200)
                for at in range(start, start + window + 200, 200):  # fill the window
                    await manager.update(arms["full"][-1], " ".join(words[at:at + 200]) + " ")
            spent: dict[str, list[float]] = {arm: [] for arm in arms}
            for i in range(sessions * commits):
                word = words[-(i + 1)]
                for arm, ids in arms.items():
                    sid = ids[i % sessions]
                    await manager.update(sid, word)  # its letters: answered from the cached row
                    t0 = time.thread_time()
                    await manager.update(sid, " ")
                    spent[arm].append(time.thread_time() - t0)
            return spent
        finally:
            await manager.close()
            engine.stop()

    log(f"adaptation: commit cost, {sessions} sessions with {window} learned words vs {sessions} new ones")
    spent = asyncio.run(measure())
    full, new = (statistics.fmean(spent[arm]) * 1e3 for arm in ("full", "new"))
    ratio = full / new
    return Row(
        "adaptation", name, ratio, "×",
        display=f"{ratio:.2f}× ({full:.2f} vs {new:.2f} ms, {window:,} vs at most {commits + 1} learned words)",
        note="a commit encodes only its own words (the learned words' ids are kept with the session's cached "
             "row) and runs the model on them alone; what still grows with the window is whole-array work over "
             "its ids (the cache's counts) and one pass over its unknown words (the new words)",
        details={"full_ms": full, "new_ms": new, "learned_words": window, "commits_per_arm": len(spent["full"])},
    )
