"""The initrd of each format, written as concatenated newc members (buffer-format.rst).

- direct: one compressed member holding /dev/console, mount points, every file of the closure under
  nix/store and the registration; the kernel runs rdinit=<toplevel>/init straight from it.
- squashfs: an uncompressed member holding nix-store.squashfs, then a compressed member with stage 1.
  The image is already compressed, so compressing it again would only cost time; and the kernel
  recognises an uncompressed member only at a 4-byte aligned offset, which the start of the file is.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from netboot.closure import REGISTRATION_NAME, Closure
from netboot.compress import Compressor
from netboot.cpio import NewcWriter, check_size
from netboot.errors import NetbootError
from netboot.files import Entry
from netboot.progress import Progress
from netboot.run import failed, last_words, require
from netboot.squashfs import mksquashfs
from netboot.stage1 import Stage1
from netboot.tree import Tree

SQUASHFS_NAME = b"nix-store.squashfs"


@dataclass(frozen=True)
class Packing:
    compressor: Compressor
    level: int | None
    explicit_level: bool
    mtime: int


@contextlib.contextmanager
def compressed_output(path: Path, packing: Packing, *, append: bool = False) -> Iterator[int]:
    """A file descriptor whose bytes land in `path` as one compressed member (or as they are, for none)."""
    with open(path, "ab" if append else "wb") as out:
        argv = packing.compressor.stream_argv(packing.level)
        if argv is None:
            yield out.fileno()
            return
        argv[0] = require(argv[0], f"needed for --compress {packing.compressor.name}")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            yield proc.stdin.fileno()
            proc.stdin.close()
        except BrokenPipeError:
            proc.stdin.close()
            proc.wait()
            raise NetbootError(
                f"{packing.compressor.name} stopped early (exit {proc.returncode}){last_words(proc.stderr.read())}"
            ) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read()
        if proc.wait() != 0:
            raise failed("compressing the initrd", argv[0], proc.returncode, err)


def leading_tree(closure: Closure) -> Tree:
    """What a root filesystem needs before the store: the console and the mount points."""
    t = Tree()
    t.char_device(b"dev/console", 0o600, 5, 1)
    t.directory(b"proc")
    t.directory(b"sys")
    store = os.fsencode(closure.store_dir).lstrip(b"/")
    t.directory(store, 0o1775)  # the Nix store's usual mode: sticky, group-writable
    return t


def write_closure(w: NewcWriter, entries: Sequence[Entry], progress: Progress) -> None:
    for e in entries:
        if stat.S_ISREG(e.mode):
            w.file(e.name, e.path, stat.S_IMODE(e.mode), e.size)
        elif stat.S_ISDIR(e.mode):
            w.directory(e.name, stat.S_IMODE(e.mode))
        else:
            w.symlink(e.name, os.readlink(e.path))
        progress.advance(e.size)


def write_direct(path: Path, closure: Closure, entries: Sequence[Entry], packing: Packing, progress: Progress) -> None:
    with compressed_output(path, packing) as fd:
        w = NewcWriter(fd, packing.mtime)
        leading_tree(closure).write(w)
        write_closure(w, entries, progress)
        w.data(os.fsencode(closure.store_dir / REGISTRATION_NAME).lstrip(b"/"), closure.registration)
        w.trailer()


def write_squashfs(
    path: Path, closure: Closure, stage1: Stage1, workdir: Path, packing: Packing, show_progress: bool
) -> None:
    # mksquashfs writes the image straight into the initrd after room for the cpio header (whose
    # length does not depend on the file size), saving a copy of the whole image.
    header_len = 110 + len(SQUASHFS_NAME) + 1
    header_len += -header_len & 3
    mksquashfs(
        closure, path, workdir, packing.compressor, packing.level, packing.explicit_level, packing.mtime,
        offset=header_len, show_progress=show_progress,
    )
    size = path.stat().st_size - header_len
    check_size(SQUASHFS_NAME, size)
    with open(path, "r+b") as f:
        w = NewcWriter(f.fileno(), packing.mtime)
        w.data_header(SQUASHFS_NAME, 0o444, size)
        w.flush()
        if f.tell() != header_len:
            raise AssertionError("cpio header length changed")
        f.seek(0, os.SEEK_END)
        w.padding(size)
        w.trailer()
    with compressed_output(path, packing, append=True) as fd:
        w = NewcWriter(fd, packing.mtime)
        stage1.tree().write(w)
        w.trailer()
