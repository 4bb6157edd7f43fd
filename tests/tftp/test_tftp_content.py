"""Name resolution: what may be served, and every way out of the root refused."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from netboot.core.errors import NetbootError
from netboot.tftp import AccessDenied, FileSystemResolver, NotFound
from netboot.tftp.content import normalize_name

PEER = ("192.0.2.1", 1000)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """root/ with files and symlinks; store/ an allowed root; secret/ outside both."""
    root, store, secret = tmp_path / "root", tmp_path / "store", tmp_path / "secret"
    for d in (root / "sub", store / "abc-kernel", secret):
        d.mkdir(parents=True)
    (root / "boot.ipxe").write_text("#!ipxe\n")
    (root / "sub" / "file").write_text("in sub")
    (store / "abc-kernel" / "bzImage").write_bytes(b"kernel")
    (secret / "passwd").write_text("root:x:0:0")
    (root / "bzImage").symlink_to(store / "abc-kernel" / "bzImage")  # out/ of store symlinks
    (root / "kernel-dir").symlink_to(store / "abc-kernel")
    (root / "escape").symlink_to(secret / "passwd")
    (root / "escape-dir").symlink_to(secret)
    (root / "relative-escape").symlink_to("../secret/passwd")
    (root / "inner-link").symlink_to("sub/file")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    return root, store, secret


def read(resolver: FileSystemResolver, name: str) -> bytes:
    content = resolver(name, PEER)
    try:
        return content.read(0, content.size + 1)
    finally:
        content.close()


@pytest.mark.parametrize(("name", "expected"), [
    ("boot.ipxe", b"#!ipxe\n"), ("/boot.ipxe", b"#!ipxe\n"), ("//sub//file", b"in sub"),
    ("sub\\file", b"in sub"), ("\\sub\\file", b"in sub"), ("./sub/./file", b"in sub"),
    ("bzImage", b"kernel"), ("kernel-dir/bzImage", b"kernel"), ("inner-link", b"in sub"),
])
def test_served_names(tree: tuple[Path, Path, Path], name: str, expected: bytes) -> None:
    root, store, _ = tree
    assert read(FileSystemResolver(root, [store]), name) == expected


@pytest.mark.parametrize("name", [
    "../secret/passwd", "..\\secret\\passwd", "sub/../../secret/passwd", "sub/../boot.ipxe", "..",
    "escape", "escape-dir/passwd", "relative-escape", "/../secret/passwd",
    "../store/abc-kernel/bzImage",  # the allowed root is a target for symlinks, not a second root to name
])
def test_escapes_are_access_violations(tree: tuple[Path, Path, Path], name: str) -> None:
    root, store, _ = tree
    with pytest.raises(AccessDenied):
        FileSystemResolver(root, [store])(name, PEER)


@pytest.mark.parametrize("name", ["", "/", "missing", "sub/missing", "/etc/passwd", "C:\\boot\\x"])
def test_missing_names_are_not_found(tree: tuple[Path, Path, Path], name: str) -> None:
    root, store, _ = tree
    with pytest.raises(NotFound):
        FileSystemResolver(root, [store])(name, PEER)


def test_store_symlinks_need_the_store_allowed(tree: tuple[Path, Path, Path]) -> None:
    root, _, _ = tree
    with pytest.raises(AccessDenied):
        FileSystemResolver(root)("bzImage", PEER)


def test_dangling_symlink_out_of_root_is_refused(tree: tuple[Path, Path, Path]) -> None:
    root, store, _ = tree
    with pytest.raises(AccessDenied):
        FileSystemResolver(root, [store])("dangling", PEER)


def test_directories_and_fifos_are_refused_without_blocking(tree: tuple[Path, Path, Path]) -> None:
    root, store, _ = tree
    os.mkfifo(root / "fifo")
    resolver = FileSystemResolver(root, [store])
    result: list[BaseException] = []

    def open_fifo() -> None:
        try:
            resolver("fifo", PEER)
        except AccessDenied as e:
            result.append(e)

    thread = threading.Thread(target=open_fifo, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "opening a FIFO blocked"
    assert result
    with pytest.raises(AccessDenied):
        resolver("sub", PEER)


def test_sockets_and_devices_are_refused(tree: tuple[Path, Path, Path]) -> None:
    import socket

    root, store, _ = tree
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "socket"))
        (root / "null").symlink_to("/dev/null")
        resolver = FileSystemResolver(root, [store, "/dev"])
        for name in ("socket", "null"):
            with pytest.raises(AccessDenied):
                resolver(name, PEER)


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(NetbootError):
        FileSystemResolver(tmp_path / "missing")


def test_normalize_name() -> None:
    assert normalize_name("\\\\boot\\\\pxelinux.0") == "boot/pxelinux.0"
    with pytest.raises(AccessDenied):
        normalize_name("a/../b")


def test_file_reads_match_the_file_at_any_offset(tmp_path: Path) -> None:
    import random

    data = random.Random(5).randbytes(300_000)
    (tmp_path / "f").write_bytes(data)
    content = FileSystemResolver(tmp_path)("f", PEER)
    rng = random.Random(6)
    try:
        assert content.size == len(data)
        offsets = [*range(0, len(data) + 2000, 1468), *(rng.randrange(len(data)) for _ in range(300))]
        for offset in [0, 512, 1024, *offsets, len(data) - 1, len(data), len(data) + 10]:
            length = rng.choice([1, 512, 1468, 65464, 100_000])
            assert content.read(offset, length) == data[offset : offset + length], (offset, length)
    finally:
        content.close()
