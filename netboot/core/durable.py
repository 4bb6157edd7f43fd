"""Renames that hold: two names swapped in one step, and a directory synced so that its new names survive a crash."""

from __future__ import annotations

import ctypes
import errno
import os

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
