"""Bounds on what a root filesystem or an OCI image may cost a build: bytes, entries, name lengths, depth.

An image is untrusted input: its tar headers may declare anything, its layers may be compression bombs, its
names as long and its trees as deep as the format allows. Each is refused with one line before it is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

from netboot.core.errors import NetbootError
from netboot.core.logtext import clip

MAX_NAME = 4096  # bytes of a path below the root: PATH_MAX (linux/limits.h), the most a system call takes
MAX_DEPTH = 256  # components of a path below the root
DEFAULT_MAX_BYTES = 16 << 30
DEFAULT_MAX_ENTRIES = 1_000_000
_SHOWN = 120  # characters of a name quoted in an error


class LimitError(NetbootError):
    """An image over one of its bounds; the message says which, and the flag that raises it."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES  # an OCI image's layers as decompressed tar streams; a root's files
    max_entries: int = DEFAULT_MAX_ENTRIES  # files, directories, links and nodes (an OCI image's: of all layers)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise NetbootError(f"--max-image-bytes {self.max_bytes} must be positive")
        if self.max_entries <= 0:
            raise NetbootError(f"--max-image-entries {self.max_entries} must be positive")


class Tally:
    """What an image has cost so far, each step checked against its limits."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self.entries = 0
        self.bytes = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise LimitError(f"the image has more than {self.limits.max_entries:,} entries (--max-image-entries)")

    def spend(self, n: int) -> None:
        """`n` more bytes have been read or written."""
        self.bytes += n
        if self.bytes > self.limits.max_bytes:
            raise self._too_big()

    def expect(self, n: int) -> None:
        """`n` more bytes are declared: refused before they are spent."""
        if self.bytes + n > self.limits.max_bytes:
            raise self._too_big()

    def _too_big(self) -> LimitError:
        return LimitError(f"the image is larger than {_size(self.limits.max_bytes)} (--max-image-bytes)")


def check_name(name: bytes, depth: int) -> None:
    """A path below the root, `depth` components deep: refused when too long or too deep for a system call."""
    if len(name) > MAX_NAME:
        raise LimitError(f"its name is {len(name):,} bytes long, more than {MAX_NAME:,}")
    if depth > MAX_DEPTH:
        raise LimitError(f"it is {depth:,} directories deep, more than {MAX_DEPTH}")


def shown(name: str | bytes) -> str:
    """A name for a one-line message: cut short when long."""
    raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")  # tarfile's undecodable bytes
    return clip(raw.decode(errors="replace"), _SHOWN)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift:,} {unit}"
    return f"{n:,} bytes"
