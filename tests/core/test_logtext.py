"""Client text as a log line shows it: every character a terminal would act on escaped, unambiguously, and cut."""

from __future__ import annotations

import pytest

from netboot.core.logtext import clip


@pytest.mark.parametrize(("text", "shown"), [
    ("machine/52-54-00-12-34-56/boot.ipxe", "machine/52-54-00-12-34-56/boot.ipxe"),
    ("\r\x1b[2Knetboot: forged\nline", r"\x0d\x1b[2Knetboot: forged\x0aline"),
    ("tab\there\0nul\x7fdel", r"tab\x09here\x00nul\x7fdel"),
    # A backslash is doubled: a client that sends the text of an escape does not get it read as one.
    (r"\x1b", r"\\x1b"),
    # Beyond ASCII: printable text stays; controls, separators, bidirectional overrides and other spaces do not.
    ("café 名前", "café 名前"),
    ("\x85\u2028\u202e\u00a0\U000e0001", r"\u0085\u2028\u202e\u00a0\U000e0001"),
    # A byte that was not UTF-8 (a TFTP name, decoded with surrogateescape) is shown as that byte.
    (b"\xff\xfename".decode("utf-8", "surrogateescape"), r"\xff\xfename"),
])
def test_what_a_terminal_would_act_on_is_escaped(text: str, shown: str) -> None:
    assert clip(text) == shown
    assert clip(text).isprintable()


def test_long_text_is_cut_before_it_is_escaped_and_says_how_long_it_was() -> None:
    shown = clip("\x1b" * 10_000)
    assert shown == r"\x1b" * 80 + "… (10,000 characters)"
    assert clip("x" * 30, 16) == "x" * 16 + "… (30 characters)"
