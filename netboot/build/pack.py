"""`netboot build`: a system closure → bzImage, initrd, cmdline, netboot.ipxe and manifest.json."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from netboot import __version__
from netboot.build import compress
from netboot.build.cache import DEFAULT_MAX, Cache
from netboot.build.closure import Closure
from netboot.build.initrd import Packing, write_direct, write_squashfs
from netboot.build.outdir import Staging
from netboot.build.progress import Progress
from netboot.build.stage1 import Stage1
from netboot.build.system import System
from netboot.errors import NetbootError
from netboot.run import require
from netboot.serve.templates import render

log = logging.getLogger(__name__)

FORMATS = ("squashfs", "direct")
LARGE_INITRD = 1 << 30  # firmware and iPXE have failed above this (nixpkgs #73588)


@dataclass(frozen=True)
class BuildOptions:
    system: Path
    out: Path
    format: str = "squashfs"
    compression: str = "zstd"
    level: int | None = None
    append: str = ""
    closure_info: Path | None = None
    progress: bool = False
    cache_dir: Path | None = None  # None: no cache
    cache_max: int = DEFAULT_MAX


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH when set (reproducible-builds.org), else 1 like every file in a Nix store."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not value:
        return 1
    if not value.isdigit() or int(value) > 0xFFFFFFFF:
        raise NetbootError(f"SOURCE_DATE_EPOCH={value!r} is not a time the initramfs can hold (0 to 2^32-1)")
    return int(value)


def kernel_cmdline(system: System, fmt: str, append: str) -> str:
    # squashfs: stage 1 runs first and reads init=; direct: the kernel runs rdinit= from the initrd.
    key = "init" if fmt == "squashfs" else "rdinit"
    return " ".join(x for x in (f"{key}={system.init}", system.params, append.strip()) if x)


def _check_options(opts: BuildOptions) -> tuple[compress.Compressor, int | None]:
    if opts.format not in FORMATS:
        raise NetbootError(f"unknown format {opts.format!r} (choose from {', '.join(FORMATS)})")
    compressor = compress.get(opts.compression)
    level = compressor.check_level(opts.level)
    argv = compressor.stream_argv(level)
    if argv is not None:
        require(argv[0], f"needed for --compress {compressor.name}")
    if opts.format == "squashfs":
        compressor.squashfs_args(level, opts.level is not None)
        require("mksquashfs", "install Debian's squashfs-tools, or use --format direct")
    if any(c in opts.append for c in "\n\r\0"):
        raise NetbootError("--append must be a single line")
    return compressor, level


def build(opts: BuildOptions) -> dict:
    """Build `opts.system` into `opts.out`, which is replaced only by a complete build (see outdir.Staging)."""
    try:
        return _build(opts)
    except OSError as e:
        # What the disk or the system refused (no space, a quota, an I/O error): one line, and the staging
        # directory and any cache entry being written are already removed.
        where = f" ({e.filename})" if e.filename else ""
        hint = ": the output's file system and the cache's need room for the build" if e.errno in (
            errno.ENOSPC, errno.EDQUOT) else ""
        raise NetbootError(f"building {opts.out} failed: {e.strerror or e}{where}{hint}") from e


def _build(opts: BuildOptions) -> dict:
    started = time.monotonic()
    compressor, level = _check_options(opts)
    packing = Packing(compressor, level, opts.level is not None, source_date_epoch())
    system = System.load(opts.system)
    cmdline = kernel_cmdline(system, opts.format, opts.append)
    if "${" in cmdline:
        raise NetbootError("the kernel command line contains '${', which iPXE would expand as a setting")

    cache = Cache(opts.cache_dir, opts.cache_max) if opts.cache_dir is not None else Cache(None)
    staging = Staging(opts.out)
    with staging as work, _explaining_full_disks(work, opts.cache_dir):
        closure = Closure.of(system.toplevel, opts.closure_info)
        stage1 = Stage1.prepare(system, closure) if opts.format == "squashfs" else None  # refuse before packing
        initrd = work / "initrd"
        scratch = work / ".scratch"
        scratch.mkdir()
        if stage1 is not None:
            stats = write_squashfs(initrd, closure, stage1, packing, cache, scratch, opts.progress)
            log.info("stage 1: busybox from %s, modules %s", stage1.busybox, " ".join(stage1.load_order) or "built in")
        else:
            progress = Progress("packing", len(closure.paths), enabled=opts.progress)
            stats = write_direct(initrd, closure, packing, cache, scratch, progress)
            progress.done()
        shutil.rmtree(scratch)
        reused = f"; {stats.reused} reused from the cache" if cache.enabled else ""
        log.info("closure: %d store paths, %d files, %.1f MiB%s", len(closure.paths), stats.files,
                 stats.bytes / 2**20, reused)

        shutil.copyfile(system.kernel, work / "bzImage")
        (work / "cmdline").write_text(cmdline + "\n")
        (work / "netboot.ipxe").write_text(
            render("netboot.ipxe", system=str(system.toplevel), format=opts.format, cmdline=cmdline)
        )
        manifest = {
            "tool": "netboot",
            "version": __version__,
            "system": str(system.toplevel),
            "kernel_version": system.kernel_version,
            "format": opts.format,
            "compression": compressor.name,
            "level": level,
            "cmdline": cmdline,
            "closure": {"paths": len(closure.paths), "files": stats.files, "bytes": stats.bytes},
            "artifacts": {name: _describe(work / name) for name in ("bzImage", "initrd", "cmdline", "netboot.ipxe")},
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for f in work.iterdir():
            f.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        initrd_size = manifest["artifacts"]["initrd"]["size"]
        if initrd_size > LARGE_INITRD:
            log.warning(
                "warning: the initrd is %.2f GiB; some firmware and iPXE fail to load initrds above 1 GiB",
                initrd_size / 2**30,
            )
        staging.commit()
    log.info(
        "built %s: initrd %.1f MiB (%s%s) in %.1f s",
        opts.out, initrd_size / 2**20, compressor.name, f" -{level}" if level is not None else "",
        time.monotonic() - started,
    )
    return manifest


_NEARLY_FULL = 16 << 20  # less free space than a tool's write buffers: what made it fail


@contextlib.contextmanager
def _explaining_full_disks(*dirs: Path | None) -> Iterator[None]:
    """A tool that fails on a full disk says so its own way (mksquashfs: "Failed to write to output
    filesystem"): while its partial output still fills the disk, name the full file system."""
    try:
        yield
    except NetbootError as e:
        for d in dirs:
            with contextlib.suppress(OSError):
                if d is not None and (st := os.statvfs(d)).f_bavail * st.f_frsize < _NEARLY_FULL:
                    raise NetbootError(f"{e} (No space left on device: the file system of {d} is full)") from e
        raise


def _describe(path: Path) -> dict:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}
