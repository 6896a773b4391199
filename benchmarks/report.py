"""The results table (Markdown, printed and put into the README) and the JSON file."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

from benchmarks.common import Row

MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
SECTION_TITLES = {
    "runtime": "1 runtime", "roofline": "2 roofline", "http": "3 batching", "overhead": "4 overhead",
    "sessions": "5 sessions", "prompt": "6 prompt", "training": "7 training", "keyboard": "8 keyboard",
    "suggest": "9 suggest", "adaptation": "10 adaptation", "soak": "11 soak",
    "error": "error",
}


def _status(row: Row) -> str:
    if row.met is None:
        return "n/a" if row.target and row.value is None else ""
    return "✅" if row.met else "❌"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(row: Row) -> str:
    if row.display is not None:
        return row.display
    if row.value is None:
        return "—"
    return f"{row.value:.3g} {row.unit}".strip()


def markdown_table(rows: list[Row]) -> str:
    lines = ["| section | measurement | result | target | | limited by / note |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(x) for x in (
            SECTION_TITLES.get(row.section, row.section), row.name, _value(row), row.target or "", _status(row),
            row.note)) + " |")
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def summary_text(meta: dict[str, Any]) -> str:
    m, model = meta["machine"], meta["model"]
    simd = "AVX-512" if m.get("avx512") else "AVX2" if m.get("avx2") else "no AVX2"
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    threads = f"{meta['threads']} thread{'s' if meta['threads'] != 1 else ''}"
    before = m.get("busy_before_start")
    busy = (f" Other work kept {before:.0%} of the CPUs busy just before the run: its figures are pessimistic."
            if before is not None and before > 0.25 else "")
    return (
        f"Measured by `{meta['command']}` on {meta['started']} ({meta['duration_s']:.0f} s): {m['cpu']} "
        f"({m['cores']} cores, {simd}); {versions}. Model `{model['path']}`: {model['cell']}, "
        f"{model['num_layers']} layers, E={model['embedding_size']}, H={model['hidden_size']}, "
        f"V={model['vocab_size']:,}, {'tied' if model['tied'] else 'untied'}, {model['weights_dtype']} weights. "
        f"{threads} for torch, onnxruntime and the service's intra-op pool. Every ratio compares "
        f"two figures measured in this run on the same weights; each figure is a median over repeats after "
        f"warm-up. Full results: `{meta['json']}`.{busy}\n"
    )


def render(meta: dict[str, Any], rows: list[Row]) -> str:
    targets = [r for r in rows if r.met is not None]
    met = sum(1 for r in targets if r.met)
    tail = f"\n{met} of {len(targets)} targets met.\n" if targets else ""
    return summary_text(meta) + "\n" + markdown_table(rows) + tail


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with everything between the bench markers replaced by ``block``."""
    pattern = re.compile(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no {MARK_START} ... {MARK_END} markers found")
    return pattern.sub(lambda _: f"{MARK_START}\n{block}{MARK_END}", text, count=1)


def between_markers(text: str) -> str:
    match = re.search(re.escape(MARK_START) + r"\n?(.*?)" + re.escape(MARK_END), text, re.DOTALL)
    if match is None:
        raise ValueError(f"no {MARK_START} ... {MARK_END} markers found")
    return match.group(1)


def merge_sections(previous: str, meta: dict[str, Any], rows: list[Row], sections: list[str],
                   order: tuple[str, ...]) -> str:
    """The README block ``previous`` with the rows of ``sections`` replaced by ``rows`` (a run of
    some sections only): the other sections' rows stay, each in its place, and a line under the
    summary says which rows were measured when, by which command."""
    titles = {title: key for key, title in SECTION_TITLES.items()}
    lines = previous.splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    if len(table) < 2:
        raise ValueError("no results table between the markers")
    head = [line for line in lines[: table[0]] if line.strip()]
    tail = [line for line in lines[table[-1] + 1:]
            if line.strip() and not re.fullmatch(r"\d+ of \d+ targets met\.", line)]
    kept: dict[str, list[str]] = {}
    for line in lines[table[0] + 2: table[-1] + 1]:
        title = line.split("|")[1].strip()
        kept.setdefault(titles.get(title.replace("\\|", "|"), title), []).append(line)
    for section in sections:
        kept.pop(section, None)
    new = markdown_table(rows).splitlines()
    fresh: dict[str, list[str]] = {}
    for row, line in zip(rows, new[2:], strict=True):
        fresh.setdefault(row.section, []).append(line)
    keys = [k for k in order if k in kept or k in fresh] + [k for k in kept if k not in order]
    body = [line for k in keys for line in fresh.get(k, kept.get(k, []))]
    statuses = [line.rsplit("|", 3)[1].strip() for line in body]
    met, judged = statuses.count("✅"), sum(1 for x in statuses if x in ("✅", "❌"))
    names = ", ".join(f"`{s}`" for s in sections)
    before = meta["machine"].get("busy_before_start")
    busy = (f" Other work kept {before:.0%} of the CPUs busy just before it: those figures are pessimistic."
            if before is not None and before > 0.25 else "")
    machine = meta["machine"]
    # The machine is named: a shared runner may give a later run other hardware than the table's.
    stamp = (f"Rows of {names} measured by `{meta['command']}` on {meta['started']} ({meta['duration_s']:.0f} s): "
             f"{machine['cpu']} ({machine['cores']} cores), model `{meta['model']['path']}`; full results "
             f"`{meta['json']}`.{busy}")
    head = [line for line in head if not line.startswith(f"Rows of {names} measured by")] + [stamp]
    out = "\n\n".join(head) + "\n\n" + "\n".join(new[:2] + body) + "\n"
    if judged:
        out += f"\n{met} of {judged} targets met.\n"
    return out + "".join(f"\n{line}\n" for line in tail)


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], errors: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**meta, "rows": [r.to_dict() for r in rows], "errors": errors}
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)
