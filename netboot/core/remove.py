"""Removing a directory tree: without recursion, without following a symlink, one directory descriptor at a time.

Every tree netboot removes goes through here: a build's staging and scratch directories (an unpacked image's
root among them), a layer's whiteout targets, published and automatic builds. shutil.rmtree and os.walk
recurse once per level, so a tree a few thousand directories deep raises RecursionError half-way; keeping a
descriptor per level would run out of descriptors (RLIMIT_NOFILE, 1,024 by default) instead. Here the walk
keeps one descriptor and a list of names: down through each directory opened with O_NOFOLLOW relative to its
parent, back up through "..", checked against the device and inode seen on the way down, so that neither a
symlink nor a directory moved meanwhile can take the removal anywhere else. It stays on one file system.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OWNER_RWX = stat.S_IRWXU


def remove_tree(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], *, dir_fd: int | None = None) -> None:
    """Remove `path` (relative to `dir_fd` when given) and everything below it. A symlink is removed, never
    followed; a directory without write or search permission is made the owner's first (an image's read-only
    directories, unpacked without root); what is gone already is no error. Raises OSError otherwise."""
    try:
        top = os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=dir_fd)
        return
    fd = _enter(path, dir_fd)
    try:
        _empty(fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path, dir_fd=dir_fd)


def _empty(top: int) -> None:
    """Remove everything in the directory `top`, which is left open."""
    device = os.fstat(top).st_dev
    fd = os.dup(top)
    down: list[tuple[str, tuple[int, int]]] = []  # the directories entered below `top`: name, and parent's identity
    try:
        while True:
            name = _clear(fd)
            if name is not None:
                here = os.fstat(fd)
                child = _enter(name, fd)
                if os.fstat(child).st_dev != device:
                    os.close(child)
                    raise OSError(errno.EXDEV, "a file system is mounted there; not removing it", name)
                os.close(fd)
                fd = child
                down.append((name, (here.st_dev, here.st_ino)))
                continue
            if not down:
                return
            name, parent_id = down.pop()
            parent = os.open("..", _DIR, dir_fd=fd)
            st = os.fstat(parent)
            if (st.st_dev, st.st_ino) != parent_id:
                os.close(parent)
                raise OSError(errno.ESTALE, "the tree was moved while it was being removed", name)
            os.close(fd)
            fd = parent
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


def _clear(fd: int) -> str | None:
    """Unlink the directory's files, symlinks and nodes until a subdirectory is met; its name, or None once empty.

    Called again when that subdirectory is gone, it reads on from what is left."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except IsADirectoryError:  # replaced by a directory since it was listed
                return entry.name
    return None


def _enter(name: str | bytes | os.PathLike[str] | os.PathLike[bytes], parent: int | None) -> int:
    """The directory `name`, opened without following a symlink, with its owner's permissions to empty it."""
    try:
        fd = os.open(name, _DIR, dir_fd=parent)
    except PermissionError:
        # Neither readable nor searchable by us: an O_PATH descriptor needs no permission and follows nothing,
        # and chmod through its /proc/self/fd link changes that very directory (open(2), O_PATH).
        handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.chmod(f"/proc/self/fd/{handle}", _OWNER_RWX)
        finally:
            os.close(handle)
        fd = os.open(name, _DIR, dir_fd=parent)
    mode = os.fstat(fd).st_mode
    if mode & _OWNER_RWX != _OWNER_RWX:  # entries can only be unlinked from a writable directory
        try:
            os.fchmod(fd, stat.S_IMODE(mode) | _OWNER_RWX)
        except BaseException:
            os.close(fd)
            raise
    return fd
