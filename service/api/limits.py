"""Request limits shared by several front ends (one function per rule, so every front end words
and enforces it the same way)."""

from __future__ import annotations

from service.config import Settings
from service.engine.errors import InvalidInputError


def check_batch_items(count: int, settings: Settings, noun: str, field: str | None) -> None:
    """At most ``NEXTWORD_MAX_BATCH_ITEMS`` texts per request (items, prompts, tensor elements)."""
    limit = settings.max_batch_items
    if count > limit:
        raise InvalidInputError(f"{count} {noun}; the limit is {limit} (NEXTWORD_MAX_BATCH_ITEMS)", field)
