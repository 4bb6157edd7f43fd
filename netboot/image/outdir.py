"""An output directory replaced atomically: built beside the old one, swapped in only when complete."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from netboot.core.errors import NetbootError
from netboot.core.run import pid_alive

MARKER = "manifest.json"  # what makes a directory a netboot output that may be replaced
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class Staging:
    """`with Staging(out) as work:` fill `work`, call commit(); on any error `out` stays as it was."""

    def __init__(self, out: Path) -> None:
        self.out = out.absolute()
        self.path: Path | None = None
        parent = self.out.parent
        if not parent.is_dir():
            raise NetbootError(f"--out {out}: {parent} is not an existing directory")
        if self.out.is_symlink() or (self.out.exists() and not self.out.is_dir()):
            raise NetbootError(f"--out {out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MARKER).is_file():
            raise NetbootError(f"--out {out} is a directory that netboot did not make (no {MARKER}); not replacing it")
        self._prefix = f".{self.out.name}.netboot-"

    def __enter__(self) -> Path:
        self._remove_stale()
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f"{self._prefix}{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            raise NetbootError(f"--out {self.out} is not writable: {e.strerror}") from e
        self.path.chmod(0o755)
        return self.path

    def commit(self) -> None:
        assert self.path is not None
        for f in self.path.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if self.out.exists():
            if not _exchange(self.path, self.out):
                old = self.out.with_name(f"{self._prefix}{os.getpid()}-old")
                os.rename(self.out, old)
                os.rename(self.path, self.out)
                self.path = old
        else:
            os.rename(self.path, self.out)
            self.path = None
        fd = os.open(self.out.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        # After commit() this removes the previous output; after a failure, the unfinished one.
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Remove what a killed build left behind (its pid is in the name and no longer runs)."""
        for p in self.out.parent.glob(f"{self._prefix}*"):
            pid = p.name[len(self._prefix) :].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
