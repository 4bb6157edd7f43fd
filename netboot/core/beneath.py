"""Opening a path beneath a root, the one way netboot does it: one real directory at a time.

Each component is opened relative to its parent's directory descriptor with O_NOFOLLOW, so a symlink or `..`
anywhere in the path cannot lead out of the root, and nothing changes between checking a path and opening it
(what openat2(2)'s RESOLVE_BENEATH does in the kernel; Python has no openat2). Used for an OCI image's layers
(`open_dir`, which refuses every symlink) and for what the servers read (`open_file`, which follows a symlink
only into the roots its caller names, e.g. an output directory's links into the Nix store).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from netboot.core.errors import NetbootError

DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO put where a file was expected cannot stall the opener (fifo(7)); fstat then decides.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
MAX_LINKS = 40  # symlinks followed for one name, as the kernel's MAXSYMLINKS (path_resolution(7))


class Outside(NetbootError):
    """A path that leads out of its root: by `..`, or through a symlink or something that is not a directory."""


class NotRegular(NetbootError):
    """A path beneath the root that is not a regular file (a directory, FIFO, socket or device)."""


@dataclass(frozen=True)
class Root:
    """A directory symlinks may lead into: an absolute link target under `path` continues beneath `fd`."""

    path: str  # as link targets spell it
    fd: int


def components(name: str) -> list[str] | None:
    """`name` as components below the root: a leading "/" dropped, "." and ".." resolved by name.

    None if ".." leaves the root. Resolving ".." by name never steps through a symlink; the components are
    then opened one real directory at a time.
    """
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return parts


def open_dir(root: int, parts: Sequence[str], *, make: Callable[[int, str, str], int] | None = None) -> int | None:
    """A new descriptor of the directory `parts` beneath the directory descriptor `root`, or None if missing.

    A symlink or anything but a directory on the way is refused (Outside). `make(parent_fd, name, path)`, if
    given, makes a missing directory and returns its descriptor.
    """
    fd = os.dup(root)
    for i, part in enumerate(parts):
        path = "/".join(parts[: i + 1])
        try:
            child = os.open(part, DIRECTORY, dir_fd=fd)
        except FileNotFoundError:
            child = make(fd, part, path) if make is not None else None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise _through(fd, part, path) from None
        finally:
            os.close(fd)
        if child is None:
            return None
        fd = child
    return fd


def open_file(root: int | str | os.PathLike[str], name: str, *,
              links: Sequence[Root] = ()) -> tuple[int, os.stat_result]:
    """A descriptor of the regular file `name` beneath `root` (a directory or its descriptor), and its stat.

    `..` may not climb above the root. A symlink is refused unless `links` names roots: then a relative one is
    resolved from its own directory, an absolute one beneath the root of `links` it names, each step again one
    real directory at a time. Raises Outside, NotRegular, or the OSError of a missing or unreadable name.
    """
    if isinstance(root, int):
        fd = _resolve(root, name, links)
    else:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = _resolve(root_fd, name, links)
        finally:
            os.close(root_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"{name} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _resolve(root: int, name: str, links: Sequence[Root]) -> int:
    pending = name.split("/")[::-1]  # what is left to walk, the next component last
    held = [os.dup(root)]  # the current root, then each directory walked into beneath it
    walked: list[str] = []  # their names, for messages
    base = ""  # the current root as messages name it: "" for `root`, else a root of `links`
    hops = 0
    try:
        while True:
            while pending and pending[-1] in ("", "."):
                pending.pop()
            if not pending:
                return os.dup(held[-1])  # the name is a directory
            part = pending.pop()
            where = "/".join([base, *walked, part] if base else [*walked, part])
            if part == "..":
                if len(held) == 1:
                    raise Outside(f"{where} leads out of {base or 'the root'}")
                os.close(held.pop())
                walked.pop()
                continue
            last = all(p in ("", ".") for p in pending)
            try:
                fd = os.open(part, _FILE if last else DIRECTORY, dir_fd=held[-1])
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if not links or not stat.S_ISLNK(os.lstat(part, dir_fd=held[-1]).st_mode):
                    raise _through(held[-1], part, where, last) from None
                hops += 1
                if hops > MAX_LINKS:
                    raise Outside(f"{name}: more than {MAX_LINKS} symlinks") from None
                target = os.readlink(part, dir_fd=held[-1])
                if target.startswith("/"):
                    into, target = _root_of(target, links, where)
                    while held:
                        os.close(held.pop())
                    held, walked, base = [os.dup(into.fd)], [], into.path.rstrip("/")
                pending.extend(target.split("/")[::-1])
                continue
            if last:
                return fd
            held.append(fd)
            walked.append(part)
    finally:
        for fd in held:
            os.close(fd)


def _root_of(target: str, links: Sequence[Root], where: str) -> tuple[Root, str]:
    """The root of `links` an absolute link target lies beneath, and the rest of the target below it."""
    for root in links:
        prefix = root.path.rstrip("/") + "/"
        if target == prefix[:-1] or target.startswith(prefix):
            return root, target[len(prefix):]
    raise Outside(f"{where} is a symlink out of the root (to {target})")


def _through(fd: int, name: str, path: str, last: bool = False) -> Outside:
    if stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
        return Outside(f"{path} is a symlink" if last else f"goes through the symlink {path}")
    return Outside(f"goes through {path}, which is not a directory")
