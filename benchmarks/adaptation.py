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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Row, log

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
    pieces = chunks(TEXT.read_text(encoding="utf-8"), ctx.pick(3000, 200))
    service = ctx.servers.service()
    results = {}
    for learn in (False, True):
        log(f"adaptation: typing {sum(w for _, w in pieces)} words of {TEXT.name}, learn={learn}")
        results[learn] = type_text(service.url, pieces, learn, card.name, card.version)
    on, off = results[True], results[False]
    gain = 100 * (on["ksr"] - off["ksr"])
    return [Row(
        "adaptation", name, gain, "points",
        display=f"{100 * on['ksr']:.2f}% vs {100 * off['ksr']:.2f}% (+{gain:.2f} points) over {on['words']:,} words",
        note="the cache LM and new words (learn=true) against the same session incognito (learn=false)",
        details={"adapting": on, "incognito": off, "text": str(TEXT), "k": K},
    )]
