"""A one-line progress display for long builds, on a terminal only."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


class Progress:
    def __init__(self, label: str, total_files: int, total_bytes: int, *, enabled: bool, out: TextIO = sys.stderr):
        self._label = label
        self._total_files = total_files
        self._total_bytes = total_bytes
        self._enabled = enabled
        self._out = out
        self._files = 0
        self._bytes = 0
        self._next = 0.0

    def advance(self, nbytes: int) -> None:
        self._files += 1
        self._bytes += nbytes
        if self._enabled and (now := time.monotonic()) >= self._next:
            self._next = now + 0.1
            self._show()

    def _show(self) -> None:
        self._out.write(
            f"\r{self._label}: {self._files:,}/{self._total_files:,} files, "
            f"{_mib(self._bytes)}/{_mib(self._total_bytes)}\x1b[K"
        )
        self._out.flush()

    def done(self) -> None:
        if self._enabled:
            self._show()
            self._out.write("\n")
            self._out.flush()
