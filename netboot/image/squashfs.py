"""The store image of the squashfs format, made by squashfs-tools' mksquashfs."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from netboot.core.compress import Compressor
from netboot.core.run import describe, dies_with_us, failed, require, run
from netboot.image.closure import REGISTRATION_NAME, Closure

log = logging.getLogger(__name__)
WHAT = "making the squashfs store image"


def mksquashfs(
    closure: Closure,
    image: Path,
    workdir: Path,
    compressor: Compressor,
    level: int | None,
    explicit_level: bool,
    mtime: int,
    *,
    offset: int = 0,
    show_progress: bool = False,
) -> None:
    """Write a squashfs of the closure plus the registration file at `offset` bytes into `image`.

    The root holds one entry per store path and `nix-path-registration`, as nixpkgs' netboot.nix makes it, so
    that it can be mounted at /nix/.ro-store under the /nix/store overlay.
    """
    registration = workdir / REGISTRATION_NAME
    registration.write_bytes(closure.registration)
    registration.chmod(0o444)
    # A store's files are all root's, and hold no extended attributes nor (in a NAR) hard links.
    _mksquashfs([*map(str, closure.paths), str(registration)],
                ["-keep-as-directory", "-no-hardlinks", "-all-root", "-no-xattrs"],
                image, compressor, level, explicit_level, mtime, offset, show_progress)


def mksquashfs_root(root: Path, image: Path, compressor: Compressor, level: int | None, explicit_level: bool,
                    mtime: int, *, all_root: bool, offset: int = 0, show_progress: bool = False) -> None:
    """Write a squashfs whose root is the directory `root`: owners, modes, hard links, devices and extended
    attributes as they are there (owners all root's with `all_root`)."""
    _mksquashfs([str(root)], ["-all-root"] if all_root else [], image, compressor, level, explicit_level, mtime,
                offset, show_progress)


def _mksquashfs(sources: list[str], options: list[str], image: Path, compressor: Compressor, level: int | None,
                explicit_level: bool, mtime: int, offset: int, show_progress: bool) -> None:
    binary = require("mksquashfs", "install Debian's squashfs-tools")
    argv = [
        binary, *sources, str(image), "-noappend", "-no-recovery", "-offset", str(offset), "-no-exports", *options,
        "-b", "1M", *compressor.squashfs_args(level, explicit_level),
        # mksquashfs caches up to a quarter of RAM by default (~1 GB for a 1 GB closure); 256M keeps the
        # build under 300 MB in all and measured no slower (BENCHMARKS.md).
        "-mem", "256M",
        # Pinned times and root mode (which otherwise follows the umask) make the image reproducible.
        "-mkfs-time", str(mtime), "-all-time", str(mtime), "-root-mode", "0755",
    ]
    if show_progress:
        _run_showing_progress(argv)
    else:
        run([*argv, "-quiet", "-no-progress"], what=WHAT)


def _run_showing_progress(argv: list[str]) -> None:
    """Run mksquashfs, passing on its progress bar ("[===/   ] done/total pct") but not its report."""
    log.debug("running %s", describe(argv))
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=dies_with_us()) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        pending = b""
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            *parts, pending = re.split(rb"[\r\n]", pending + chunk)
            bars = [p for p in parts if p.startswith(b"[")]
            if bars:
                sys.stderr.write("\rsquashfs: " + bars[-1].decode(errors="replace") + "\x1b[K")
                sys.stderr.flush()
        err = proc.stderr.read()
    sys.stderr.write("\n")
    if proc.returncode != 0:
        raise failed(WHAT, argv[0], proc.returncode, err)
