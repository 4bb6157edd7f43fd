"""core.beneath, the one way to open a path beneath a root: every way out refused, the ways in kept."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netboot.core.beneath import NotRegular, Outside, Root, components, open_dir, open_file
from netboot.core.errors import NetbootError
from netboot.server.namespace import Generation


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ (sub/file, links in and out), store/ (a root links may lead into), secret/ (outside both)."""
    root, store, secret = tmp_path / "root", tmp_path / "store", tmp_path / "secret"
    for d in (root / "sub" / "deeper", store / "abc-kernel", store / "def-system", secret):
        d.mkdir(parents=True)
    (root / "file").write_text("top")
    (root / "sub" / "file").write_text("in sub")
    (store / "abc-kernel" / "bzImage").write_text("kernel")
    (store / "def-system" / "kernel").symlink_to(store / "abc-kernel" / "bzImage")  # store paths link on
    (secret / "passwd").write_text("root:x:0:0")
    (root / "inner").symlink_to("sub/file")
    (root / "up-and-in").symlink_to("sub/deeper/../file")
    (root / "kernel").symlink_to(store / "def-system" / "kernel")
    (root / "kernel-dir").symlink_to(store / "abc-kernel")
    (root / "absolute-out").symlink_to(secret / "passwd")
    (root / "dir-out").symlink_to(secret)
    (root / "relative-out").symlink_to("../secret/passwd")
    (root / "store-up").symlink_to(store / "abc-kernel" / ".." / ".." / "secret" / "passwd")
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    return root


@pytest.fixture
def store_root(tree: Path) -> Iterator[Root]:
    store = tree.parent / "store"
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    yield Root(str(store), fd)
    os.close(fd)


def read(root: Path | int, name: str, links: tuple[Root, ...] = ()) -> str:
    fd, st = open_file(root, name, links=links)
    with os.fdopen(fd) as f:
        text = f.read()
    assert st.st_size == len(text)
    return text


@pytest.mark.parametrize(("name", "text"), [
    ("file", "top"), ("sub/file", "in sub"), ("./sub//file", "in sub"), ("sub/../file", "top"),
    ("sub/deeper/../../file", "top"), ("/file", "top"),
])
def test_names_beneath_the_root(tree: Path, name: str, text: str) -> None:
    assert read(tree, name) == text


def test_the_root_as_a_descriptor(tree: Path) -> None:
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read(fd, "sub/file") == "in sub"
        assert read(fd, "file") == "top"  # the descriptor is the caller's, left open and where it was
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["..", "../secret/passwd", "sub/../../secret/passwd", "sub/deeper/../../.."])
def test_dot_dot_out_of_the_root_is_refused(tree: Path, name: str) -> None:
    with pytest.raises(Outside, match="leads out of the root"):
        open_file(tree, name)


@pytest.mark.parametrize("name", ["inner", "kernel", "absolute-out", "relative-out", "loop-a"])
def test_without_roots_to_follow_into_every_symlink_is_refused(tree: Path, name: str) -> None:
    with pytest.raises(Outside, match=f"^{name} is a symlink$"):
        open_file(tree, name)


def test_a_symlink_in_a_parent_is_refused(tree: Path) -> None:
    with pytest.raises(Outside, match=r"^goes through the symlink dir-out$"):
        open_file(tree, "dir-out/passwd")
    with pytest.raises(Outside, match=r"^goes through the symlink kernel-dir$"):
        open_file(tree, "kernel-dir/bzImage")


def test_a_file_in_a_parent_is_refused(tree: Path) -> None:
    with pytest.raises(Outside, match=r"^goes through file, which is not a directory$"):
        open_file(tree, "file/x")


def test_symlinks_followed_into_the_named_roots(tree: Path, store_root: Root) -> None:
    links = (store_root,)
    assert read(tree, "inner", links) == "in sub"
    assert read(tree, "up-and-in", links) == "in sub"
    assert read(tree, "kernel", links) == "kernel"  # root -> store -> store again
    assert read(tree, "kernel-dir/bzImage", links) == "kernel"


@pytest.mark.parametrize(("name", "message"), [
    ("absolute-out", "absolute-out is a symlink out of the root (to "),
    ("dir-out/passwd", "dir-out is a symlink out of the root (to "),
    ("relative-out", "leads out of the root"),
    ("store-up", "leads out of "),  # into the store, then `..` above it
])
def test_symlinks_out_of_every_named_root_are_refused(tree: Path, store_root: Root, name: str, message: str) -> None:
    with pytest.raises(Outside) as refused:
        open_file(tree, name, links=(store_root,))
    assert message in str(refused.value)


def test_a_symlink_loop_ends(tree: Path, store_root: Root) -> None:
    with pytest.raises(Outside, match="more than 40 symlinks"):
        open_file(tree, "loop-a", links=(store_root,))


def test_missing_names_are_the_os_error(tree: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_file(tree, "missing")
    with pytest.raises(FileNotFoundError):
        open_file(tree, "sub/missing/file")


def refusal_without_blocking(call: Callable[[], object]) -> str:
    """The message of the NetbootError `call()` raises, which it must do within 5 s (in a thread, so that a
    call that blocks fails the test instead of hanging it)."""
    result: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except NetbootError as e:
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "opening a FIFO blocked"
    assert len(result) == 1, "no error"
    return str(result[0])


def test_a_fifo_is_refused_without_blocking(tree: Path) -> None:
    """Opening a FIFO for reading waits for a writer; beneath opens it non-blocking and refuses it."""
    os.mkfifo(tree / "fifo")
    assert refusal_without_blocking(lambda: open_file(tree, "fifo")) == "fifo is not a regular file"


def test_a_device_and_a_directory_are_not_regular_files(tree: Path) -> None:
    (tree / "null").symlink_to("/dev/null")
    dev = os.open("/dev", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(NotRegular):
            open_file(tree, "null", links=(Root("/dev", dev),))
    finally:
        os.close(dev)
    for name in ("sub", "sub/", "sub/deeper/.."):
        with pytest.raises(NotRegular):
            open_file(tree, name)


def test_a_regular_file_comes_back_blocking(tree: Path) -> None:
    fd, _ = open_file(tree, "file")
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("name", "parts"), [
    ("a/b", ["a", "b"]), ("/a/./b/", ["a", "b"]), ("a/../b", ["b"]), ("", []), ("..", None), ("a/../..", None),
    ("../a", None),
])
def test_components(name: str, parts: list[str] | None) -> None:
    assert components(name) == parts


def test_open_dir_walks_makes_and_refuses(tree: Path) -> None:
    root = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    made: list[str] = []

    def make(fd: int, name: str, path: str) -> int:
        made.append(path)
        os.mkdir(name, dir_fd=fd)
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)

    try:
        fd = open_dir(root, ["sub", "deeper"])
        assert fd is not None
        os.close(fd)
        assert open_dir(root, ["sub", "missing"]) is None
        fd = open_dir(root, ["sub", "new", "newer"], make=make)
        assert fd is not None
        os.close(fd)
        assert made == ["sub/new", "sub/new/newer"]
        assert (tree / "sub/new/newer").is_dir()
        with pytest.raises(Outside, match=r"^goes through the symlink dir-out$"):
            open_dir(root, ["dir-out", "x"], make=make)
        with pytest.raises(Outside, match=r"^goes through sub/file, which is not a directory$"):
            open_dir(root, ["sub", "file", "x"])
        assert not (tree.parent / "secret" / "x").exists()
    finally:
        os.close(root)


def output_dir(path: Path) -> Path:
    path.mkdir()
    for name in ("bzImage", "cmdline", "netboot.ipxe"):
        (path / name).write_text(name)
    (path / "manifest.json").write_text('{"cmdline": "init=/x", "format": "direct"}')
    return path


def test_an_output_directory_with_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """The server holds an output directory's files open: a FIFO put there does not stall it."""
    out = output_dir(tmp_path / "out")
    os.mkfifo(out / "initrd")
    message = refusal_without_blocking(lambda: Generation(out).close())
    assert message == f"{out}/initrd is not a regular file inside {out} or the Nix store"


def test_an_output_directory_may_link_within_itself(tmp_path: Path) -> None:
    out = output_dir(tmp_path / "out")
    (out / "images").mkdir()
    (out / "images" / "initrd-1").write_text("initrd")
    (out / "initrd").symlink_to("images/initrd-1")
    (out / "netboot.ipxe").unlink()
    (out / "netboot.ipxe").symlink_to(out / "cmdline")  # absolute, into the directory itself
    gen = Generation(out)
    try:
        assert os.pread(gen.files["initrd"].fd, 100, 0) == b"initrd"
        assert os.pread(gen.files["netboot.ipxe"].fd, 100, 0) == b"cmdline"
    finally:
        gen.close()
    (out / "initrd").unlink()
    (out / "initrd").symlink_to("../elsewhere")
    (tmp_path / "elsewhere").write_text("x")
    with pytest.raises(NetbootError, match="initrd is not a regular file inside"):
        Generation(out)
