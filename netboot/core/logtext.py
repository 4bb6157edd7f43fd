"""Text a client or an image sent, made fit for one short line (a log line, an error): whatever it sent, a bad
input costs one bounded line, and it cannot forge another line or rewrite the operator's terminal.

`clip` is the one way client text enters a log line or a message: every logger of client text (HTTP, TFTP, the
status API, overlays) passes it through here, once, where it is put into the line.
"""

from __future__ import annotations

LIMIT = 80  # characters of client text in one log line

_SURROGATES = range(0xDC80, 0xDD00)  # bytes that were not UTF-8, kept by the "surrogateescape" error handler


def clip(text: str, limit: int = LIMIT) -> str:
    """`text` escaped (see `_escape`) when short, else its start escaped and its whole length."""
    if len(text) <= limit:
        return _escape(text)
    return f"{_escape(text[:limit])}… ({len(text):,} characters)"


def _escape(text: str) -> str:
    """`text` with every character that is not printable as `\\xNN` (ASCII controls, among them \\r, \\n and ESC;
    and a byte that was not UTF-8, which surrogateescape decoding kept), else `\\uNNNN` (`\\UNNNNNNNN`): line and
    paragraph separators, bidirectional overrides, spaces other than ASCII's. A backslash is doubled, so that no
    escape can be forged either. Printable text beyond ASCII is kept as it is."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escaped, text))


def _escaped(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    n = ord(c)
    if n < 0x80:
        return f"\\x{n:02x}"
    if n in _SURROGATES:
        return f"\\x{n - 0xDC00:02x}"
    return f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"
