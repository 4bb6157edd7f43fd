"""A streaming newc (SVR4, 070701) archive writer for Linux initramfs members.

Hand-written rather than GNU cpio or libarchive because the kernel's initramfs rules need control those
tools don't give (Documentation/driver-api/early-userspace/buffer-format.rst, init/initramfs.c):
- every entry is written with nlink=1 and its own sequential inode, so hard links can never pair up
  across members (the kernel keys links on (dev, ino) and resets its table at each TRAILER!!!);
- a file of 4 GiB or more is an error (filesize is a 32-bit field; GNU cpio silently drops such files);
- owner 0:0 (a root filesystem's entries may name theirs) and one fixed mtime, for bit-for-bit reproducible
  output;
- file data goes to the output by sendfile(2) without passing through Python (into a file or a
  compressor's pipe), or in 1 MiB pieces into an in-process compressor, so memory stays flat whatever
  the closure's size.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from netboot.core.errors import NetbootError

MAX_FILE_SIZE = 0xFFFFFFFF  # newc filesize is 8 hex digits
_SMALL = 64 * 1024  # files up to this size are read into the write buffer; larger ones are sendfile'd
_FLUSH = 1024 * 1024


def check_size(name: bytes, size: int) -> None:
    if size > MAX_FILE_SIZE:
        raise NetbootError(
            f"{os.fsdecode(name)} is {size / 2**30:.1f} GiB; an initrd (newc cpio) cannot hold a file of 4 GiB or more"
        )


def _pad4(n: int) -> bytes:
    return b"\0" * (-n & 3)


class FdSink:
    """Output to a file descriptor: file data goes by sendfile(2), never through Python."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | bytearray) -> None:
        write_all(self.fd, data)

    def copy(self, fd: int, size: int, path: bytes) -> None:
        offset = 0
        while offset < size:
            sent = os.sendfile(self.fd, fd, offset, size - offset)
            if sent == 0:
                raise NetbootError(f"{os.fsdecode(path)} changed size while being packed")
            offset += sent


class StreamSink:
    """Output to a writable object (an in-process compressor); file data is read in 1 MiB pieces."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def write(self, data: bytes | bytearray) -> None:
        self.stream.write(data)

    def copy(self, fd: int, size: int, path: bytes) -> None:
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(1 << 20, size - offset), offset)
            if not chunk:
                raise NetbootError(f"{os.fsdecode(path)} changed size while being packed")
            self.stream.write(chunk)
            offset += len(chunk)


class NewcWriter:
    """Appends newc entries to a sink: a file descriptor (a file, a compressor's pipe) or a stream."""

    def __init__(self, out: int | FdSink | StreamSink, mtime: int) -> None:
        if not 0 <= mtime <= 0xFFFFFFFF:
            raise NetbootError(f"mtime {mtime} does not fit the initramfs' 32-bit mtime field")
        self._sink = FdSink(out) if isinstance(out, int) else out
        self._mtime = mtime
        self._buf = bytearray()
        self._ino = 0

    def _header(self, name: bytes, mode: int, size: int, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0),
                owner: tuple[int, int] = (0, 0)) -> None:
        check_size(name, size)
        self._ino += 1
        namesize = len(name) + 1
        self._buf += b"070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X" % (
            self._ino, mode, owner[0], owner[1], nlink, self._mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0,
        )
        self._buf += name
        self._buf += b"\0"
        self._buf += _pad4(110 + namesize)

    def directory(self, name: bytes, perm: int = 0o755, owner: tuple[int, int] = (0, 0)) -> None:
        self._header(name, stat.S_IFDIR | perm, 0, nlink=2, owner=owner)
        self._maybe_flush()

    def symlink(self, name: bytes, target: bytes, owner: tuple[int, int] = (0, 0)) -> None:
        # The link target is the entry's data, without a terminating NUL.
        self._header(name, stat.S_IFLNK | 0o777, len(target), owner=owner)
        self._buf += target
        self._buf += _pad4(len(target))
        self._maybe_flush()

    def char_device(self, name: bytes, perm: int, major: int, minor: int) -> None:
        self._header(name, stat.S_IFCHR | perm, 0, rdev=(major, minor))

    def special(self, name: bytes, mode: int, rdev: tuple[int, int], owner: tuple[int, int]) -> None:
        """A device node, FIFO or socket: `mode` holds its type."""
        self._header(name, mode, 0, rdev=rdev, owner=owner)
        self._maybe_flush()

    def data(self, name: bytes, content: bytes, perm: int = 0o444) -> None:
        """A regular file whose content is in memory."""
        self._header(name, stat.S_IFREG | perm, len(content))
        self._buf += content
        self._buf += _pad4(len(content))
        self._maybe_flush()

    def data_header(self, name: bytes, perm: int, size: int) -> None:
        """The header of a regular file whose `size` bytes the caller puts in the output itself, then padding()."""
        self._header(name, stat.S_IFREG | perm, size)

    def padding(self, size: int) -> None:
        """The padding after a file of `size` bytes written by the caller."""
        self._buf += _pad4(size)

    def file(self, name: bytes, path: bytes, perm: int, size: int, owner: tuple[int, int] = (0, 0)) -> None:
        """A regular file copied from `path`, whose size was `size` when the closure was walked."""
        self._header(name, stat.S_IFREG | perm, size, owner=owner)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise NetbootError(f"cannot read {os.fsdecode(path)}: {e.strerror}") from e
        try:
            if size <= _SMALL:
                got = os.read(fd, size + 1)
                if len(got) != size:
                    raise NetbootError(f"{os.fsdecode(path)} changed size while being packed")
                self._buf += got
            else:
                self.flush()
                self._sink.copy(fd, size, path)
        finally:
            os.close(fd)
        self._buf += _pad4(size)
        self._maybe_flush()

    def trailer(self) -> None:
        """End this member; every member is a multiple of 4 bytes long, so the next can follow directly.

        Inode numbers restart after a trailer, so a member's bytes never depend on what came before it.
        """
        self._ino = -1  # the trailer itself carries inode 0, as GNU cpio writes it
        self._header(b"TRAILER!!!", 0, 0)
        self._ino = 0
        self.flush()

    def _maybe_flush(self) -> None:
        if len(self._buf) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._sink.write(self._buf)
            self._buf.clear()


def write_all(fd: int, data: bytes | bytearray) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
