"""The initrd of each format, written as concatenated newc members (buffer-format.rst).

- direct: a compressed member with /dev/console, the mount points and the store directory, one compressed
  member per store path (cached across builds), and one with the registration; the kernel runs
  rdinit=<toplevel>/init straight from the unpacked store.
- squashfs: an uncompressed member holding nix-store.squashfs, then a compressed member with stage 1.
  The image is already compressed, so compressing it again would only cost time; and the kernel
  recognises an uncompressed member only at a 4-byte aligned offset, which the start of the file is.
- erofs: likewise with nix-store.erofs, when erofs compresses it (lz4); with any other compressor the image is
  uncompressed and its member is compressed instead.
- squashfs and erofs with --fetch: the image is a file of its own beside the initrd (artifacts.IMAGE), which
  holds stage 1 alone; stage 1 downloads the image at boot.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import gzip
import hashlib
import io
import lzma
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import zstandard

from netboot import __version__
from netboot.core.compress import COMPRESSORS, Compressor
from netboot.core.errors import NetbootError
from netboot.core.remove import remove_tree
from netboot.core.run import dies_with_us, failed, require
from netboot.image.cache import LAYOUT, Cache, nar_hashes
from netboot.image.closure import REGISTRATION_NAME, Closure
from netboot.image.cpio import FdSink, NewcWriter, StreamSink, check_size
from netboot.image.erofs import lay_out_closure, mkfs_erofs
from netboot.image.files import Entry, closure_entries
from netboot.image.progress import Progress
from netboot.image.squashfs import mksquashfs
from netboot.image.stage1 import FetchedImage, Stage1
from netboot.image.tree import Tree

SQUASHFS_NAME = b"nix-store.squashfs"
EROFS_NAME = b"nix-store.erofs"


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
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE,
                                preexec_fn=dies_with_us())
        assert proc.stdin is not None and proc.stderr is not None
        try:
            yield proc.stdin.fileno()
            proc.stdin.close()
        except BrokenPipeError:
            proc.stdin.close()
            proc.wait()
            raise failed("compressing the initrd", argv[0], proc.returncode, proc.stderr.read()) from None
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


def write_closure(w: NewcWriter, entries: Sequence[Entry]) -> None:
    for e in entries:
        if stat.S_ISREG(e.mode):
            w.file(e.name, e.path, stat.S_IMODE(e.mode), e.size)
        elif stat.S_ISDIR(e.mode):
            w.directory(e.name, stat.S_IMODE(e.mode))
        else:
            w.symlink(e.name, os.readlink(e.path))


_NONE = COMPRESSORS["none"]
SMALL_MEMBER = 4 << 20  # members up to this many bytes of file data are compressed in-process


def write_member(dest: Path, packing: Packing, fill: Callable[[NewcWriter], None], data_size: int) -> None:
    """One compressed newc member: `fill` writes the entries, the trailer ends it.

    A closure has many small store paths and a few big ones. Small members are compressed in-process
    (a process each would cost more than they take to compress); big ones go through the compressor's
    command, multithreaded, with file data sent by sendfile. Which way depends only on the member's size,
    so the bytes of a build stay the same from one build to the next.
    """
    if data_size <= SMALL_MEMBER and packing.compressor.name in _IN_PROCESS:
        buf = io.BytesIO()
        w = NewcWriter(StreamSink(buf), packing.mtime)
        fill(w)
        w.trailer()
        dest.write_bytes(compress_bytes(buf.getvalue(), packing.compressor, packing.level))
        return
    with _ONE_BIG, compressed_output(dest, packing) as fd:
        w = NewcWriter(fd, packing.mtime)
        fill(w)
        w.trailer()


# A big member's compressor uses every core by itself; two at once would only fight over them.
_ONE_BIG = threading.Lock()

_IN_PROCESS: dict[str, Callable[[bytes, int | None], bytes]] = {
    "zstd": lambda data, level: zstandard.ZstdCompressor(level=level or 3).compress(data),
    "gzip": lambda data, level: gzip.compress(data, compresslevel=level or 6, mtime=0),
    # The kernel's xz decoder: CRC32 or no check, a dictionary of at most 1 MiB.
    "xz": lambda data, level: lzma.compress(
        data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
        filters=[{"id": lzma.FILTER_LZMA2, "preset": level if level is not None else 6, "dict_size": 1 << 20}],
    ),
    "none": lambda data, level: data,
}


def compress_bytes(data: bytes, compressor: Compressor, level: int | None) -> bytes:
    """`data` as one compressed member: in-process where Python can, else through the compressor's command."""
    if compressor.name in _IN_PROCESS:
        return _IN_PROCESS[compressor.name](data, level)
    argv = compressor.stream_argv(level)
    assert argv is not None  # "none" is in-process
    require(argv[0], f"needed for {compressor.name} compression")
    done = subprocess.run(argv, input=data, capture_output=True, check=False)
    if done.returncode != 0:
        raise NetbootError(f"{argv[0]} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


@dataclass
class DirectStats:
    files: int = 0
    bytes: int = 0
    reused: int = 0  # store paths whose member came from the cache


def write_direct(
    path: Path, closure: Closure, packing: Packing, cache: Cache, scratch: Path, progress: Progress
) -> DirectStats:
    """The direct format as concatenated members: leading directories, one member per store path, registration.

    The kernel unpacks concatenated members one after the other; each ends at an entry boundary, and the
    store directory comes in the first one, so every directory still precedes its contents. One member per
    store path lets a rebuild reuse the members of every path that did not change (the cache), and gives
    the same bytes whether they were reused or made anew.
    """
    suffix = f".cpio.{packing.compressor.name}"
    hashes = nar_hashes(closure.registration)
    stats = DirectStats()
    keys: set[str] = set()
    uncached = Cache(None)

    def member_of(store_path: Path) -> tuple[int, dict]:
        nar = hashes.get(str(store_path))
        key = Cache.key(kind="direct-member", layout=LAYOUT, version=__version__, path=str(store_path), nar=nar,
                        compressor=packing.compressor.name, level=packing.level, mtime=packing.mtime)
        if nar:  # without a NAR hash the content is unknown: never reuse
            keys.add(key)
            found = cache.open(key, suffix)
            if found is not None:
                stats.reused += 1
                progress.advance(found[1]["bytes"], reused=True)
                return found

        def make(dest: Path) -> dict:
            entries = closure_entries([store_path])
            for e in entries:
                check_size(e.path, e.size)
            nbytes = sum(e.size for e in entries)
            write_member(dest, packing, lambda w: write_closure(w, entries), nbytes)
            return {"files": len(entries), "bytes": nbytes}

        made = (cache if nar else uncached).put(key, suffix, make, scratch)
        progress.advance(made[1]["bytes"])
        return made

    leading = scratch / "leading"
    write_member(leading, packing, lambda w: leading_tree(closure).write(w), 0)
    registration = scratch / "registration"
    store = os.fsencode(closure.store_dir / REGISTRATION_NAME).lstrip(b"/")
    write_member(registration, packing, lambda w: w.data(store, closure.registration), len(closure.registration))

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        members = list(pool.map(member_of, closure.paths))
    try:
        with open(path, "wb") as out:
            for part in [_open(leading), *(fd for fd, _ in members), _open(registration)]:
                try:
                    _append(out.fileno(), part)
                finally:
                    os.close(part)
    finally:
        for fd, _ in members:
            with contextlib.suppress(OSError):
                os.close(fd)
    for _, meta in members:
        stats.files += meta["files"]
        stats.bytes += meta["bytes"]
    cache.evict(keys)
    return stats


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _append(out: int, fd: int) -> None:
    """Copy all of `fd` to `out` at its current position, in the kernel (copy_file_range)."""
    _copy_range(fd, out, 0, os.fstat(fd).st_size)


# copy_file_range refuses some pairs of files that sendfile copies (a cache and an output on different file
# systems: EXDEV on kernels before 5.3 and again since 5.19 between file systems of different types).
_NO_COPY_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _copy_range(src: int, out: int, offset: int, size: int) -> None:
    end = offset + size
    copy = os.copy_file_range
    while offset < end:
        try:
            n = copy(src, out, end - offset, offset)
        except OSError as e:
            if copy is _sendfile or e.errno not in _NO_COPY_RANGE:
                raise
            copy = _sendfile
            continue
        if n == 0:
            raise NetbootError("a cached file changed size while being copied")
        offset += n


def _sendfile(src: int, out: int, count: int, offset: int) -> int:
    return os.sendfile(out, src, offset, count)


def write_squashfs(
    path: Path, closure: Closure, stage1: Stage1, packing: Packing, cache: Cache, scratch: Path, show_progress: bool,
    *, fetched: Path | None = None,
) -> DirectStats:
    """The store image member (reused whole from the cache when the closure is unchanged), then stage 1; with
    `fetched`, the image goes there as a file of its own and the initrd holds stage 1 alone."""
    # mksquashfs writes the image straight into the initrd after room for the cpio header (whose
    # length does not depend on the file size), saving a copy of the whole image.
    header_len = _header_len(SQUASHFS_NAME) if fetched is None else 0
    target = fetched or path
    key, cacheable = _image_key(closure, "squashfs-image", packing)
    found = cache.open(key, ".squashfs") if cacheable else None
    stats = DirectStats()
    if found is not None:
        fd, meta = found
        stats.reused = len(closure.paths)
        with open(target, "wb") as out:
            out.seek(header_len)
            try:
                _append(out.fileno(), fd)
            finally:
                os.close(fd)
    else:
        meta = _closure_meta(closure)
        mksquashfs(
            closure, target, scratch, packing.compressor, packing.level, packing.explicit_level, packing.mtime,
            offset=header_len, show_progress=show_progress,
        )
        if cacheable and cache.enabled:
            image_size = target.stat().st_size - header_len

            def make(dest: Path) -> dict:
                with open(target, "rb") as src, open(dest, "wb") as out:
                    _copy_range(src.fileno(), out.fileno(), header_len, image_size)
                return meta

            os.close(cache.put(key, ".squashfs", make, scratch)[0])
            cache.evict({key})
    stats.files, stats.bytes = meta["files"], meta["bytes"]
    size = target.stat().st_size - header_len
    if fetched is not None:
        with open(target, "rb") as f:
            image = FetchedImage.of(SQUASHFS_NAME.decode(), f.fileno())
        append_stage1(path, replace(stage1, image=image), packing)
        return stats
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
    append_stage1(path, stage1, packing)
    return stats


def write_erofs(path: Path, closure: Closure, stage1: Stage1, packing: Packing, cache: Cache, scratch: Path,
                *, fetched: Path | None = None) -> DirectStats:
    """The store image member (reused whole from the cache when the closure is unchanged), then stage 1; with
    `fetched`, the image goes there as a file of its own and the initrd holds stage 1 alone."""
    compressor = packing.compressor
    args = compressor.erofs_args(packing.level)
    # The image is the same whichever compressor the initrd member then gets, when erofs does not compress.
    key, cacheable = _image_key(closure, "erofs-image", replace(packing, compressor=_NONE, level=None), args=args)
    found = cache.open(key, ".erofs") if cacheable else None
    stats = DirectStats()
    if found is not None:
        fd, meta = found
        stats.reused = len(closure.paths)
    else:

        def make(dest: Path) -> dict:
            # The laid out root stays in the scratch directory, removed while the build finishes (pack.py).
            root = scratch / "erofs-root"
            root.mkdir()
            try:
                files, nbytes = lay_out_closure(closure, root)
                mkfs_erofs(root, dest, packing.compressor, packing.level, packing.mtime, identity=key,
                           all_root=True, xattrs=False)
            except BaseException:
                with contextlib.suppress(OSError):  # the staging directory's removal tries again
                    remove_tree(root)
                raise
            return {"files": files, "bytes": nbytes}

        fd, meta = (cache if cacheable else Cache(None)).put(key, ".erofs", make, scratch)
        if cacheable:
            cache.evict({key})
    stats.files, stats.bytes = meta["files"], meta["bytes"]
    try:
        if fetched is not None:
            stage1 = replace(stage1, image=FetchedImage.of(EROFS_NAME.decode(), fd))
            with open(fetched, "wb") as out:
                _append(out.fileno(), fd)
        else:
            write_image_member(path, EROFS_NAME, fd, packing)
    finally:
        os.close(fd)
    append_stage1(path, stage1, packing)
    return stats


def write_image_member(path: Path, name: bytes, image: int, packing: Packing) -> None:
    """`path` made anew with one member: the image file (open at `image`) as `name`.

    Uncompressed when the image compresses itself (the kernel recognises an uncompressed member only at a
    4-byte aligned offset, which the start of the file is); else compressed like every other member, and the
    kernel unpacks it into memory at boot.
    """
    size = os.fstat(image).st_size
    check_size(name, size)
    compressed = name.endswith(b".erofs") and not packing.compressor.compresses_erofs()
    with contextlib.ExitStack() as stack:
        if compressed:
            fd = stack.enter_context(compressed_output(path, packing))
        else:
            fd = stack.enter_context(open(path, "wb")).fileno()
        w = NewcWriter(fd, packing.mtime)
        w.data_header(name, 0o444, size)
        w.flush()
        if compressed:
            FdSink(fd).copy(image, size, name)
        else:
            _append(fd, image)
        w.padding(size)
        w.trailer()


def append_stage1(path: Path, stage1: Stage1, packing: Packing) -> None:
    """Stage 1 as one compressed member at the end of `path`."""
    with compressed_output(path, packing, append=True) as fd:
        w = NewcWriter(fd, packing.mtime)
        stage1.tree().write(w)
        w.trailer()


def _header_len(name: bytes) -> int:
    """The length of a newc header for `name`, padded: it does not depend on the file's size."""
    n = 110 + len(name) + 1
    return n + (-n & 3)


def _image_key(closure: Closure, kind: str, packing: Packing, **more: object) -> tuple[str, bool]:
    """The cache key of a closure's image, and whether it may be cached (every path's NAR hash is known)."""
    hashes = nar_hashes(closure.registration)
    cacheable = all(hashes.get(str(p)) for p in closure.paths)
    key = Cache.key(kind=kind, layout=LAYOUT, version=__version__,
                    registration=hashlib.sha256(closure.registration).hexdigest(),
                    compressor=packing.compressor.name, level=packing.level, mtime=packing.mtime, **more)
    return key, cacheable


def _closure_meta(closure: Closure) -> dict:
    entries = closure_entries(closure.paths)  # mksquashfs would make unreadable files empty
    return {"files": len(entries), "bytes": sum(e.size for e in entries)}
