"""Text a client or an image sent, made fit for one short line (a log line, an error): whatever it sent, a bad
input costs one bounded line."""

from __future__ import annotations

LIMIT = 80  # characters of client text in one log line


def clip(text: str, limit: int = LIMIT) -> str:
    """`text` itself when short, else its start and its whole length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"
