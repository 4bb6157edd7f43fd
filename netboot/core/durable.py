"""Renames that hold: a file replaced whole, two names swapped in one step, and a directory synced so that its new
names survive a crash."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def sync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that the names created or renamed in it survive a crash (fsync(2): syncing a file
    does not sync the entry naming it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may take less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace(path: Path, data: bytes) -> None:
    """Write a file whole: a temporary file beside it, fsynced, renamed over `path` (the directory is the caller's
    to sync, once for all it renames)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two names in one step with renameat2(RENAME_EXCHANGE) (files or directories); False where the file
    system or the kernel does not support it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fsdecode(b))
