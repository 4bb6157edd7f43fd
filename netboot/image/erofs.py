"""The image of the erofs format, made by erofs-utils' mkfs.erofs.

mkfs.erofs (1.5, Debian 12's) reads one directory, whereas a closure is many store paths and a registration
file. So the image's root is laid out in a scratch directory first: hard links to the store's files (copies
where the store's file system refuses a link), the directories and symlinks made anew. mkfs.erofs turns
files it meets twice (same inode) into one hard-linked file; a store optimised by Nix shares inodes between
store paths and another store does not, so a file met a second time is copied, and the image stays the
same from one machine to the next, as a NAR has no hard links.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path

from netboot.core.compress import Compressor
from netboot.core.errors import NetbootError
from netboot.core.run import require, run
from netboot.image.closure import REGISTRATION_NAME, Closure
from netboot.image.files import lstat

WHAT = "making the erofs image"
# link() refuses across file systems (EXDEV), files of other users under protected_hardlinks (EPERM), and
# files with too many links already (EMLINK); each of those is copied instead.
_CANNOT_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES)


def mkfs_erofs(source: Path, image: Path, compressor: Compressor, level: int | None, mtime: int, *,
               identity: str, all_root: bool, xattrs: bool) -> None:
    """Write an erofs image of the directory `source` to `image`.

    Reproducible: every inode gets `mtime` (-T), and the file system's UUID (random by default) is derived
    from `identity`, a digest of what the image holds.
    """
    binary = require("mkfs.erofs", "install Debian's erofs-utils")
    argv = [binary, "--quiet", *compressor.erofs_args(level), f"-T{mtime}",
            f"-U{uuid.UUID(bytes=bytes.fromhex(identity)[:16])}", *(["--all-root"] if all_root else []),
            *([] if xattrs else ["-x-1"]), str(image), str(source)]
    run(argv, what=WHAT)


def lay_out_closure(closure: Closure, dest: Path) -> tuple[int, int]:
    """The image's root for a closure, in `dest` (empty): one directory per store path, and the registration
    (the same root as the squashfs format's); returns the closure's (files and directories, bytes).

    Store paths are laid out side by side on a thread each: the work is system calls, which run in parallel.
    """
    linker = _Linker()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        counts = list(pool.map(lambda p: linker.tree(os.fsencode(p), os.fsencode(dest / p.name)), closure.paths))
    registration = dest / REGISTRATION_NAME
    registration.write_bytes(closure.registration)
    registration.chmod(0o444)
    linker.finish()
    return sum(n for n, _ in counts), sum(b for _, b in counts)


class _Linker:
    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.seen_lock = threading.Lock()
        self.can_link = True
        self.directories: list[list[tuple[bytes, int]]] = []  # made writable; their modes are set at the end

    def tree(self, src: bytes, dst: bytes) -> tuple[int, int]:
        """Lay out `src` at `dst`; (files and directories, bytes)."""
        st = lstat(src)
        if not stat.S_ISDIR(st.st_mode):
            self.entry(src, dst, st)
            return 1, st.st_size if stat.S_ISREG(st.st_mode) else 0
        entries, nbytes = 0, 0
        directories: list[tuple[bytes, int]] = []
        self.directories.append(directories)
        stack = [(src, dst, st)]
        while stack:
            src_dir, dst_dir, st = stack.pop()
            os.mkdir(dst_dir, 0o700)
            directories.append((dst_dir, stat.S_IMODE(st.st_mode)))
            entries += 1
            try:
                with os.scandir(src_dir) as it:
                    children = [(d.name, d.stat(follow_symlinks=False)) for d in it]
            except OSError as e:
                raise NetbootError(f"cannot read {os.fsdecode(src_dir)}: {e.strerror}") from e
            for name, child in children:
                if stat.S_ISDIR(child.st_mode):
                    stack.append((os.path.join(src_dir, name), os.path.join(dst_dir, name), child))
                else:
                    self.entry(os.path.join(src_dir, name), os.path.join(dst_dir, name), child)
                    entries += 1
                    nbytes += child.st_size if stat.S_ISREG(child.st_mode) else 0
        return entries, nbytes

    def entry(self, src: bytes, dst: bytes, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(st.st_mode):
            inode = (st.st_dev, st.st_ino)
            with self.seen_lock:  # two threads linking one inode would make mkfs.erofs a hard link
                first = inode not in self.seen
                self.seen.add(inode)
            if first and self.can_link:
                try:
                    os.link(src, dst, follow_symlinks=False)
                    return
                except OSError as e:
                    if e.errno not in _CANNOT_LINK:
                        raise
                    self.can_link = e.errno == errno.EMLINK  # the others refuse every file alike
            _copy(src, dst, st)
        else:
            raise NetbootError(f"{os.fsdecode(src)} is not a regular file, directory or symlink")

    def finish(self) -> None:
        for directories in self.directories:
            for path, mode in reversed(directories):  # children first: a read-only parent stays enterable
                os.chmod(path, mode)


def _copy(src: bytes, dst: bytes, st: os.stat_result) -> None:
    try:
        shutil.copyfile(src, dst, follow_symlinks=False)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise NetbootError(f"cannot read {os.fsdecode(src)}: {e.strerror}") from e
    os.chmod(dst, stat.S_IMODE(st.st_mode))

