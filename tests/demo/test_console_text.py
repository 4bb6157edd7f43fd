"""What the demos show of a VM's console: text, without the escape sequences that clear or redraw the terminal the
demo runs in (EDK2 clears the screen and places its text with them)."""

from __future__ import annotations

import io

from devtools.qemu import terminal_text, watch


def test_escape_sequences_are_taken_out_and_cursor_placements_are_newlines() -> None:
    edk2 = ("\x1b[0m\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001\x1b[25;80H"
            "\x1b[1mStart PXE\x1b[0m")
    assert terminal_text(edk2) == ("\n\nBdsDxe: loading Boot0001\nStart PXE", "")
    assert terminal_text("reset\x1bc then\x1b(B ascii\x1b]0;a title\x07 and\x1b]8;;x\x1b\\ links") == (
        "reset then ascii and links", "")
    # Control characters go (a bell, a backspace, a form feed); tabs, newlines and returns stay.
    assert terminal_text("a\x07b\x08c\x0cd\te\r\nf") == ("abcd\te\r\nf", "")


def test_a_sequence_cut_between_two_reads_is_held_for_the_next() -> None:
    shown, held = terminal_text("booting\x1b[2")
    assert (shown, held) == ("booting", "\x1b[2")
    assert terminal_text(held + "J done") == (" done", "")
    assert terminal_text("x\x1b") == ("x", "\x1b")
    # A string that never ends is not held forever.
    assert terminal_text("\x1b]0;" + "t" * 1000) == ("", "")


def test_watch_echoes_what_a_program_prints_without_its_escapes() -> None:
    echo = io.StringIO()
    script = r"printf '\033[2J\033[1;1Hfirmware\033c\n'; printf 'half\033['; sleep 0.2; printf '1mway\n'"
    result = watch(["sh", "-c", script], timeout=30, echo=echo)
    assert echo.getvalue() == "\nfirmware\nhalfway\n"
    assert "\x1b[2J" in result.console  # what the console said is kept whole for the checks
