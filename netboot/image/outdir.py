"""An output directory replaced atomically: built beside the old one, swapped in only when complete.

The directory it is built in stays 0700 (mkdtemp's mode) until it is published: a root filesystem unpacked
there (an OCI image's device nodes and setuid files) is no other user's to reach, even when a killed build
leaves it behind; only then is it opened to readers (0755), holding nothing but the artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from types import TracebackType

from netboot.core.durable import exchange, sync_dir
from netboot.core.errors import NetbootError
from netboot.core.remove import remove_tree
from netboot.core.run import pid_alive

log = logging.getLogger(__name__)

MARKER = "manifest.json"  # what makes a directory a netboot output that may be replaced


class Staging:
    """`with Staging(out) as work:` fill `work`, call commit(); on any error `out` stays as it was."""

    def __init__(self, out: Path) -> None:
        self.out = out.absolute()
        self.path: Path | None = None
        self._made: list[Path] = []  # the parents this build created, outermost first
        existing = self.out.parent
        while not existing.exists() and not existing.is_symlink():
            existing = existing.parent
        if not existing.is_dir():
            raise NetbootError(f"--out {out}: {existing} is not a directory")
        if self.out.is_symlink() or (self.out.exists() and not self.out.is_dir()):
            raise NetbootError(f"--out {out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MARKER).is_file():
            raise NetbootError(f"--out {out} is a directory that netboot did not make (no {MARKER}); not replacing it")
        self._prefix = f".{self.out.name}.netboot-"

    def __enter__(self) -> Path:
        self._make_parents()
        self._remove_stale()
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f"{self._prefix}{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            self._remove_parents()
            raise NetbootError(f"--out {self.out} is not writable: {e.strerror}") from e
        return self.path

    def _make_parents(self) -> None:
        """Create the missing parents of --out, as `mkdir -p` (and make, cargo, meson with their output
        directories) would; a failed build removes them again (_remove_parents), leaving nothing behind."""
        missing = [p for p in reversed(self.out.parents) if not p.exists()]
        for p in missing:
            try:
                p.mkdir()
            except FileExistsError:
                continue  # another build made it meanwhile: it is theirs to keep
            except OSError as e:
                self._remove_parents()
                raise NetbootError(f"--out {self.out}: cannot create {p}: {e.strerror}") from e
            self._made.append(p)
            sync_dir(p.parent)

    def _remove_parents(self) -> None:
        for p in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty (someone else's files now): left as it is
                p.rmdir()
        self._made = []

    def commit(self) -> None:
        assert self.path is not None
        for f in self.path.iterdir():
            if not stat.S_ISREG(os.lstat(f).st_mode):  # a scratch tree left over would be published with it
                raise NetbootError(f"{f} is not an artifact; not publishing {self.out}")
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(self.path, 0o755)
        if self.out.exists():
            if not exchange(self.path, self.out):
                old = self.out.with_name(f"{self._prefix}{os.getpid()}-old")
                os.rename(self.out, old)
                os.rename(self.path, self.out)
                self.path = old
        else:
            os.rename(self.path, self.out)
            self.path = None
        sync_dir(self.out.parent)
        self._made = []  # the output's now

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        # After commit() this removes the previous output; after a failure, the unfinished one (still 0700
        # when it cannot be removed).
        if self.path is not None:
            _remove(self.path)
        self._remove_parents()

    def _remove_stale(self) -> None:
        """Remove what a killed build left behind (its pid is in the name and no longer runs): a directory of
        ours, never another user's or a symlink. One that cannot be removed is named and left; the build goes on."""
        for p in self.out.parent.glob(f"{self._prefix}*"):
            pid = p.name[len(self._prefix) :].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(p)
                    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                        _remove(p)


def _remove(path: Path) -> None:
    try:
        remove_tree(path)
    except OSError as e:
        log.warning("warning: cannot remove %s: %s", path, e.strerror or e)

