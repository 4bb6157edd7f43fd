"""Making a rename or a new name durable: the directory that holds it synced to disk."""

from __future__ import annotations

import os


def sync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that the names created or renamed in it survive a crash (fsync(2): syncing a file
    does not sync the entry naming it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
