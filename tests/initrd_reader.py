"""Reading initrds back for tests: the kernel's member splitting, then libarchive / GNU cpio on each member."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import libarchive


@dataclass
class Item:
    name: str
    filetype: int
    mode: int
    size: int
    uid: int
    gid: int
    mtime: int
    linkpath: str | None
    rdev: tuple[int, int]
    data: bytes


def newc_headers(member: bytes) -> list[tuple[int, str, int, int, int]]:
    """(offset, name, ino, nlink, mode) of each entry of an uncompressed newc member, checking its alignment rules."""
    out = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"entry at unaligned offset {pos}"
        head = member[pos : pos + 110]
        assert head[:6] == b"070701", f"bad magic at {pos}: {head[:6]!r}"
        fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, nlink, filesize, namesize = fields[0], fields[1], fields[4], fields[6], fields[11]
        name = member[pos + 110 : pos + 110 + namesize - 1].decode()
        assert member[pos + 110 + namesize - 1] == 0
        out.append((pos, name, ino, nlink, mode))
        pos += 110 + namesize
        pos += -pos & 3
        pos += filesize
        pos += -pos & 3
        if name == "TRAILER!!!":
            return out


def archives(data: bytes) -> list[bytes]:
    """Concatenated uncompressed newc archives, one by one (each ends with its TRAILER!!!)."""
    found = []
    while data:
        pos, name, *_ = newc_headers(data)[-1]
        end = pos + 110 + len(name) + 1
        end += -end & 3
        found.append(data[:end])
        data = data[end:]
    return found


def split(initrd: bytes) -> tuple[bytes | None, bytes]:
    """(leading uncompressed newc member or None, the rest), as the kernel's unpack_to_rootfs sees them."""
    if not initrd.startswith(b"070701"):
        return None, initrd
    pos, name, *_ = newc_headers(initrd)[-1]
    end = pos + 110 + len(name) + 1
    end += -end & 3
    return initrd[:end], initrd[end:]


def items(member: bytes) -> list[Item]:
    """Every entry of one member (compressed or not), read by libarchive."""
    result = []
    with libarchive.memory_reader(member) as archive:
        for e in archive:
            data = b"".join(e.get_blocks()) if e.isreg else b""
            result.append(
                Item(e.pathname, e.filetype, e.mode, e.size, e.uid, e.gid, e.mtime, e.linkpath,
                     (e.rdevmajor, e.rdevminor), data)
            )
    return result


def decompress(member: bytes, tool: str) -> bytes:
    argv = {"zstd": ["zstd", "-dc"], "xz": ["xz", "-dc"], "gzip": ["gzip", "-dc"], "lz4": ["lz4", "-dc"]}[tool]
    return subprocess.run(argv, input=member, capture_output=True, check=True).stdout


def cpio_extract(member: bytes, into: Path) -> None:
    """Unpack an uncompressed newc member with GNU cpio, the reference implementation."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=member, cwd=into, check=True,
        capture_output=True,
    )
