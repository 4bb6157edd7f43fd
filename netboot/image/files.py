"""The files of a closure in archive order: sorted, each directory before its contents."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from netboot.core.errors import NetbootError


@dataclass(frozen=True, slots=True)
class Entry:
    path: bytes  # absolute path on this machine
    mode: int  # st_mode: type and permission bits
    size: int  # bytes of data (regular files only)

    @property
    def name(self) -> bytes:
        """The name inside an archive: relative, as the kernel's initramfs unpacker wants."""
        return self.path.lstrip(b"/")


def lstat(path: bytes) -> os.stat_result:
    """os.lstat, its failure a NetbootError naming the path."""
    try:
        return os.lstat(path)
    except OSError as e:
        raise NetbootError(f"cannot read {os.fsdecode(path)}: {e.strerror}") from e


def walk(top: bytes) -> Iterator[Entry]:
    """`top` and everything below it, depth first, children sorted by name, without following symlinks."""
    stack = [(top, lstat(top))]
    while stack:
        path, st = stack.pop()
        mode = st.st_mode
        if stat.S_ISREG(mode):
            yield Entry(path, mode, st.st_size)
        elif stat.S_ISLNK(mode):
            yield Entry(path, mode, 0)
        elif stat.S_ISDIR(mode):
            yield Entry(path, mode, 0)
            try:
                with os.scandir(path) as it:
                    children = sorted((d.path, d.stat(follow_symlinks=False)) for d in it)
            except OSError as e:
                raise NetbootError(f"cannot read {os.fsdecode(path)}: {e.strerror}") from e
            stack.extend(reversed(children))
        else:
            raise NetbootError(f"{os.fsdecode(path)} is not a regular file, directory or symlink")


def closure_entries(paths: Iterable[os.PathLike[str] | str]) -> list[Entry]:
    """Every file of the given store paths, checked to be readable before anything is written."""
    entries: list[Entry] = []
    for p in paths:
        for entry in walk(os.fsencode(p)):
            if stat.S_ISREG(entry.mode):
                _check_readable(entry.path)
            entries.append(entry)
    return entries


def _check_readable(path: bytes) -> None:
    # mksquashfs replaces an unreadable file by an empty one with only a warning; find out first.
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
    except OSError as e:
        raise NetbootError(f"cannot read {os.fsdecode(path)}: {e.strerror}") from e
