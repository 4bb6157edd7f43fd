"""The store image of the squashfs format, made by squashfs-tools' mksquashfs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from netboot.closure import REGISTRATION_NAME, Closure
from netboot.compress import Compressor
from netboot.run import require, run


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
    binary = require("mksquashfs", "install Debian's squashfs-tools")
    registration = workdir / REGISTRATION_NAME
    registration.write_bytes(closure.registration)
    registration.chmod(0o444)
    argv = [
        binary, *map(str, closure.paths), str(registration), str(image),
        "-noappend", "-no-recovery", "-offset", str(offset),
        "-keep-as-directory", "-no-hardlinks", "-all-root", "-no-xattrs", "-no-exports",
        "-b", "1M", *compressor.squashfs_args(level, explicit_level),
        # Pinned times and root mode (which otherwise follows the umask) make the image reproducible.
        "-mkfs-time", str(mtime), "-all-time", str(mtime), "-root-mode", "0755",
    ]
    if show_progress:
        run([*argv, "-quiet"], what="making the squashfs store image", stdout=sys.stderr, stderr=subprocess.PIPE)
    else:
        run([*argv, "-quiet", "-no-progress"], what="making the squashfs store image")
