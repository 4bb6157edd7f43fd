"""A one-line progress display for long builds, on a terminal only."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """'packing: 12/40 store paths (30 from the cache), 812 MiB', redrawn at most ten times a second."""

    def __init__(self, label: str, total: int, *, enabled: bool, out: TextIO = sys.stderr):
        self._label = label
        self._total = total
        self._enabled = enabled
        self._out = out
        self._done = self._reused = self._bytes = 0
        self._next = 0.0
        self._lock = threading.Lock()  # store paths are packed on several threads

    def advance(self, nbytes: int, *, reused: bool = False) -> None:
        with self._lock:
            self._done += 1
            self._reused += reused
            self._bytes += nbytes
            if self._enabled and (now := time.monotonic()) >= self._next:
                self._next = now + 0.1
                self._show()

    def _show(self) -> None:
        reused = f" ({self._reused} from the cache)" if self._reused else ""
        self._out.write(
            f"\r{self._label}: {self._done}/{self._total} store paths{reused}, {self._bytes / 2**20:,.0f} MiB\x1b[K"
        )
        self._out.flush()

    def done(self) -> None:
        if self._enabled:
            self._show()
            self._out.write("\n")
            self._out.flush()
