"""What the TFTP server serves: a name resolves to a readable object with a size.

`Resolver` is the seam for `netboot serve`: it may hand out files under a root (`FileSystemResolver`) or
generated content (`BytesContent`), and refuses a name by raising `NotFound` or `AccessDenied`, which the
server turns into ERROR 1 or ERROR 2.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from netboot.core.beneath import NotRegular, Outside, Root, open_file
from netboot.core.errors import NetbootError

Peer = tuple[Any, ...]  # a socket address: (host, port) or (host, port, flowinfo, scope_id)


class ContentError(NetbootError):
    """A name the server must refuse; `tftp_code` is the TFTP error code to answer with."""

    tftp_code = 0


class NotFound(ContentError):
    tftp_code = 1


class AccessDenied(ContentError):
    tftp_code = 2


@runtime_checkable
class Content(Protocol):
    """A readable object of known size; read() at any offset, repeatedly (retransmissions re-read)."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


# A resolver may also return an awaitable of the content (generated on demand, off the event loop): the server
# then starts the transfer when it is ready.
Resolver = Callable[[str, Peer], Content | Awaitable[Content]]


class BytesContent:
    """Content held in memory, e.g. a rendered iPXE script."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass


class FileContent:
    """An open regular file, read with pread(2) so that no offset is shared and no whole file is loaded.

    Reads go through a small read-ahead buffer: a lock-step transfer asks for one block at a time, and one
    system call per 64 KiB instead of one per block is a tenth of the server's work per packet."""

    READ_AHEAD = 64 * 1024

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self._size = size
        self._buffer = b""
        self._buffer_offset = 0

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        start = offset - self._buffer_offset
        if start < 0 or start + length > len(self._buffer):
            self._buffer = os.pread(self.fd, max(length, self.READ_AHEAD), offset)
            self._buffer_offset, start = offset, 0
            if length >= len(self._buffer):
                return self._buffer
        return self._buffer[start : start + length]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def normalize_name(name: str) -> str:
    """The relative path a client means, or AccessDenied.

    "\\" is a separator (Windows clients) and leading "/" are dropped (pxelinux and U-Boot send "/name");
    a ".." component is refused outright rather than resolved, so no name can climb out of the root.
    """
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AccessDenied("parent directory references are not allowed")
    if not parts:
        raise NotFound("no file name")
    return "/".join(parts)


class FileSystemResolver:
    """Regular files below `root`, opened through core.beneath. A symlink is followed when it stays inside the
    root (a relative one) or leads into the root or one of `allowed_roots` (an absolute one): an out/ directory
    of store symlinks needs allowed_roots=["/nix/store"]."""

    def __init__(self, root: str | os.PathLike[str],
                 allowed_roots: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NetbootError(f"TFTP root {os.fspath(root)!r} is not a directory")
        # Each root as link targets may spell it: as given, and its real path.
        self.allowed_roots = tuple(dict.fromkeys(
            spelling for r in (root, *allowed_roots) for spelling in (os.path.abspath(r), os.path.realpath(r))))

    def __call__(self, name: str, peer: Peer) -> FileContent:
        relative = normalize_name(name)
        roots: list[Root] = []
        try:
            for path in self.allowed_roots:
                with contextlib.suppress(OSError):  # a root that is gone is no place to link to
                    roots.append(Root(path, os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)))
            fd, st = open_file(self.root, relative, links=roots)
        except FileNotFoundError:
            raise NotFound("file not found") from None
        except Outside:
            raise AccessDenied("outside the served directory") from None
        except NotRegular:
            raise AccessDenied("not a regular file") from None
        except OSError as e:
            raise AccessDenied(e.strerror or "cannot open") from None
        finally:
            for r in roots:
                os.close(r.fd)
        return FileContent(fd, st.st_size)
