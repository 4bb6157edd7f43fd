"""The newc writer against the kernel's rules, read back by libarchive and GNU cpio."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from initrd_reader import cpio_extract, items, newc_headers

from netboot.core.errors import NetbootError
from netboot.image.cpio import NewcWriter
from netboot.image.tree import Tree


def write(path: Path, fill, mtime: int = 1) -> bytes:
    with open(path, "wb") as f:
        w = NewcWriter(f.fileno(), mtime)
        fill(w)
        w.trailer()
    return path.read_bytes()


def test_every_entry_type_reads_back(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"abc")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(300_000))  # above the in-memory threshold: sent with sendfile

    def fill(w: NewcWriter) -> None:
        w.directory(b"d", 0o555)
        w.file(b"d/small", os.fsencode(small), 0o444, 3)
        w.file(b"d/big", os.fsencode(big), 0o555, 300_000)
        w.symlink(b"d/link", b"/nix/store/x-target")
        w.char_device(b"console", 0o600, 5, 1)
        w.data(b"d/generated", b"12345", 0o644)
        w.directory(b"d/empty")

    data = write(tmp_path / "a.cpio", fill, mtime=1234)
    got = {e.name: e for e in items(data)}
    assert list(got) == ["d", "d/small", "d/big", "d/link", "console", "d/generated", "d/empty"]
    assert got["d/small"].data == b"abc" and stat.S_IMODE(got["d/small"].mode) == 0o444
    assert got["d/big"].data == big.read_bytes() and stat.S_IMODE(got["d/big"].mode) == 0o555
    assert got["d/link"].linkpath == "/nix/store/x-target"
    assert got["console"].rdev == (5, 1) and stat.S_ISCHR(got["console"].mode)
    assert got["d/generated"].data == b"12345"
    assert {(e.uid, e.gid, e.mtime) for e in got.values()} == {(0, 0, 1234)}
    headers = newc_headers(data)  # asserts 4-byte alignment of every header
    assert [h[2] for h in headers] == [1, 2, 3, 4, 5, 6, 7, 0]  # inodes restart at each member; trailer 0
    cpio_extract(data, tmp_path / "x")
    assert (tmp_path / "x/d/big").read_bytes() == big.read_bytes()
    assert os.readlink(tmp_path / "x/d/link") == "/nix/store/x-target"


def test_gnu_cpio_lists_it(tmp_path: Path) -> None:
    data = write(tmp_path / "a.cpio", lambda w: (w.directory(b"etc"), w.data(b"etc/motd", b"hi\n")))
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True).stdout
    assert listing.split() == [b"etc", b"etc/motd"]


def test_members_concatenate(tmp_path: Path) -> None:
    """Each member is a multiple of 4 bytes and restarts inode numbers, so members are independent."""
    one = write(tmp_path / "1", lambda w: w.data(b"a", b"x"))
    two = write(tmp_path / "2", lambda w: w.data(b"a", b"x"))
    assert one == two and len(one) % 4 == 0


def test_file_of_4_gib_is_an_error(tmp_path: Path) -> None:
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(1 << 32)
    with pytest.raises(NetbootError, match=r"d/huge is 4\.0 GiB; an initrd \(newc cpio\) cannot hold a file"):
        write(tmp_path / "a.cpio", lambda w: w.file(b"d/huge", os.fsencode(huge), 0o444, 1 << 32))


def test_largest_size_field_is_accepted(tmp_path: Path) -> None:
    with open(tmp_path / "a.cpio", "wb") as f:
        NewcWriter(f.fileno(), 1).data_header(b"almost", 0o444, (1 << 32) - 1)


def test_file_changed_size_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12")
    with pytest.raises(NetbootError, match="changed size"):
        write(tmp_path / "a.cpio", lambda w: w.file(b"f", os.fsencode(f), 0o444, 5))


def test_mtime_must_fit_32_bits(tmp_path: Path) -> None:
    with pytest.raises(NetbootError, match="32-bit"):
        NewcWriter(0, 1 << 32)


def test_tree_writes_parents_first(tmp_path: Path) -> None:
    t = Tree()
    t.file(b"lib/modules/6.1/kernel/fs/overlay.ko", b"\x7fELF")
    t.file(b"init", b"#!/bin/sh\n", 0o755)
    t.directory(b"lib-extra")
    t.char_device(b"dev/console", 0o600, 5, 1)
    data = write(tmp_path / "t.cpio", t.write)
    names = [e.name for e in items(data)]
    assert names == [
        "dev", "dev/console", "init", "lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/kernel",
        "lib/modules/6.1/kernel/fs", "lib/modules/6.1/kernel/fs/overlay.ko", "lib-extra",
    ]
