"""Logging for the service: human-readable text or one JSON object per line (for log shippers).

Only the ``service`` logger tree (and uvicorn's, when asked) is configured here, so importing the
service into another program does not take over its root logger.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import Any

# uvicorn adds color_message (the message with ANSI colours): noise in JSON.
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName", "color_message",
}
_HANDLER_MARK = "_nextword_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra={...}`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


_SESSION_SEGMENT = re.compile(r"(/v1/sessions/)(?!stream(?:[/?]|$))[^/?\s]+")
_QUERY = re.compile(r"\?[^\s\"]*")


def redact_path(path: str) -> str:
    """A request path as logs may keep it: a session id is a bearer credential for its session,
    and a query string may carry user text (``/v1/sessions/stream?text=...``)."""
    return _QUERY.sub("", _SESSION_SEGMENT.sub(r"\1{session_id}", path))


class RedactRequestPaths(logging.Filter):
    """Applies :func:`redact_path` to the paths uvicorn's access and WebSocket log lines carry."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "/" in a for a in record.args):
            record.args = tuple(redact_path(a) if isinstance(a, str) and "/" in a else a for a in record.args)
        return True


_REDACT = RedactRequestPaths()


def redact_uvicorn_paths() -> None:
    """Install the filter on uvicorn's loggers (idempotent; also for plain ``uvicorn`` runs)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


def _level(name: str) -> int:
    # uvicorn knows "trace"; the stdlib does not: treat it as debug.
    return logging.DEBUG if name.lower() == "trace" else getattr(logging, name.upper(), logging.INFO)


def configure_logging(level: str = "info", fmt: str = "text", *, uvicorn: bool = False) -> None:
    """Attach one stderr handler with the chosen format to the ``service`` logger (and, with
    ``uvicorn=True``, to uvicorn's loggers, replacing their handlers so JSON output is uniform).

    Idempotent: calling it again (a second ``create_app()``) replaces our handler, not stacks it."""
    redact_uvicorn_paths()
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = ["service"] + (["uvicorn", "uvicorn.error", "uvicorn.access"] if uvicorn else [])
    for name in names:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False) or uvicorn]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(_level(level))
        # uvicorn.error propagates to uvicorn; avoid printing its records twice.
        logger.propagate = False
