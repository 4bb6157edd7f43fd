"""Text a client sent, made fit for one short log line: whatever it sent, a bad input costs one bounded line."""

from __future__ import annotations

LIMIT = 80  # characters of client text in one log line


def clip(text: str, limit: int = LIMIT) -> str:
    """`text` itself when short, else its start and how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit})"
