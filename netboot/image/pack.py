"""`netboot build`: a system closure → the kernel (bzImage, or Image on arm64), initrd, cmdline, netboot.ipxe and
manifest.json (and with --uki netboot.efi, a unified kernel image; with --sign-key, the kernel and that image signed
for Secure Boot; with --fetch, the image, which stage 1 downloads)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from netboot import __version__
from netboot.core import compress
from netboot.core.artifacts import (
    DEFAULT_COMPRESSION,
    FORMATS,
    IMAGE,
    IMAGE_FORMATS,
    IMAGE_SHA256,
    KERNEL_FILES,
    UKI,
    files,
)
from netboot.core.errors import NetbootError
from netboot.core.ipxe_scripts import fetch_args, render
from netboot.core.remove import remove_tree
from netboot.core.run import require
from netboot.image import oci, rootfs, uki
from netboot.image.cache import DEFAULT_MAX, Cache
from netboot.image.closure import Closure
from netboot.image.initrd import Packing, write_direct, write_erofs, write_squashfs
from netboot.image.kernel import Kernel
from netboot.image.limits import ImageLimits
from netboot.image.outdir import Staging
from netboot.image.progress import Progress
from netboot.image.signing import Signer, check_pe
from netboot.image.stage1 import Stage1
from netboot.image.system import System

log = logging.getLogger(__name__)

# Firmware and iPXE have failed above this (nixpkgs #73588); iPXE places initrds below 4 GiB, where PCI space
# crowds them out, so above about 2 GB they fail to boot (nixpkgs #203593, iPXE #526): the warning names --fetch.
LARGE_INITRD = 1 << 30


@dataclass(frozen=True)
class BuildOptions:
    system: Path | None  # a Nix system; else rootfs or oci, with kernel
    out: Path
    format: str = "squashfs"
    compression: str | None = None  # None: the format's default (DEFAULT_COMPRESSION)
    level: int | None = None
    append: str = ""
    closure_info: Path | None = None
    progress: bool = False
    cache_dir: Path | None = None  # None: no cache
    cache_max: int = DEFAULT_MAX
    rootfs: Path | None = None  # a root filesystem directory
    oci: Path | None = None  # an OCI image archive
    kernel: Path | None = None  # the kernel for rootfs or oci (kernel.py: a bzImage or an arm64 Image)
    modules: Path | None = None  # its modules (/lib/modules/<version>)
    init: str = "/sbin/init"  # the init of rootfs or oci
    limits: ImageLimits = field(default_factory=ImageLimits)  # what rootfs or oci may cost
    busybox: Path | None = None  # stage 1's busybox; None: the system's own (stage1.find_busybox)
    sign_key: Path | None = None  # sign the kernel (and the UKI) with this key, for Secure Boot
    sign_cert: Path | None = None  # ... whose certificate this is
    uki: bool = False  # also write netboot.efi, the unified kernel image
    fetch: bool = False  # the image as a file of its own, which stage 1 downloads, instead of in the initrd


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH when set (reproducible-builds.org), else 1 like every file in a Nix store."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not value:
        return 1
    if not value.isdigit() or int(value) > 0xFFFFFFFF:
        raise NetbootError(f"SOURCE_DATE_EPOCH={value!r} is not a time the initramfs can hold (0 to 2^32-1)")
    return int(value)


def _check_options(opts: BuildOptions) -> tuple[compress.Compressor, int | None]:
    if opts.format not in FORMATS:
        raise NetbootError(f"unknown format {opts.format!r} (choose from {', '.join(FORMATS)})")
    compressor = compress.get(opts.compression or DEFAULT_COMPRESSION[opts.format])
    level = compressor.check_level(opts.level)
    if opts.format == "erofs" and compressor.compresses_erofs() and opts.level is None:
        level = 1  # mkfs.erofs compresses on one core, where lz4hc (levels 3 and above) takes three times longer
    argv = compressor.stream_argv(level)
    if argv is not None:
        require(argv[0], f"needed for --compress {compressor.name}")
    if opts.format == "squashfs":
        compressor.squashfs_args(level, opts.level is not None)
        require("mksquashfs", "install Debian's squashfs-tools, or use --format direct")
    if opts.format == "erofs":
        require("mkfs.erofs", "install Debian's erofs-utils, or use --format squashfs or direct")
    if opts.fetch and opts.format not in IMAGE_FORMATS:
        raise NetbootError(f"--fetch downloads an image at boot: it needs --format {' or '.join(IMAGE_FORMATS)}, "
                           f"not {opts.format}")
    inputs = [flag for flag, given in (("SYSTEM", opts.system), ("--rootfs", opts.rootfs), ("--oci", opts.oci))
              if given is not None]
    if len(inputs) != 1:
        both = f" (not {' and '.join(inputs)})" if inputs else ""
        raise NetbootError(f"give one of SYSTEM, --rootfs DIR and --oci IMAGE.tar{both}")
    if opts.system is not None:
        for flag, given in (("--kernel", opts.kernel), ("--modules", opts.modules)):
            if given is not None:
                raise NetbootError(f"{flag} is for --rootfs and --oci; a Nix system brings its own")
    else:
        if opts.kernel is None:
            raise NetbootError(f"{inputs[0]} needs --kernel KERNEL (an x86_64 bzImage or an arm64 Image)")
        if opts.closure_info is not None:
            raise NetbootError("--closure-info is for a Nix system")
    if opts.busybox is not None and opts.format not in IMAGE_FORMATS:
        raise NetbootError(f"--busybox is for the stage 1 of the {' and '.join(IMAGE_FORMATS)} formats; the "
                           f"{opts.format} format has none")
    if any(c in opts.append for c in "\n\r\0"):
        raise NetbootError("--append must be a single line")
    if (opts.sign_key is None) != (opts.sign_cert is None):
        raise NetbootError("--sign-key and --sign-cert go together (the key and its certificate)")
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
    system = System.load(opts.system) if opts.system is not None else None
    given = system.kernel if system is not None else opts.kernel
    signer = _signer(opts, given)
    if opts.uki:
        assert given is not None  # _check_options: --rootfs and --oci need --kernel
        # The stub is the kernel's architecture's (linuxaa64.efi.stub for an arm64 Image).
        uki.check(Kernel.load(given).arch)
    cache = Cache(opts.cache_dir, opts.cache_max) if opts.cache_dir is not None else Cache(None)
    staging = Staging(opts.out)
    with staging as work, _explaining_full_disks(work, opts.cache_dir):
        scratch = work / ".scratch"
        scratch.mkdir(mode=0o700)
        if system is not None:
            init, params = str(system.init), system.params
            _cmdline(opts.format, init, params, opts.append)  # refused before packing
            described, kernel = _pack_nix(opts, system, packing, cache, work, scratch), system.kernel_image
            kernel_version, name = system.kernel_version, str(system.toplevel)
            osrel = system.toplevel / "etc" / "os-release"
        else:
            root = _root_system(opts, scratch)
            init, params = root.init, ""
            _cmdline(opts.format, init, params, opts.append)
            described, kernel = _pack_root(opts, root, packing, work, scratch), root.kernel
            kernel_version, name = root.kernel_version, str(opts.rootfs or opts.oci)
            osrel = None  # the root's own is not read: it may lead anywhere on this machine
        secure = _SecureBoot(signer, uki.os_release(name, kernel_version, osrel) if opts.uki else None,
                             packing.mtime)
        image = _describe(work / IMAGE) if opts.fetch else None
        # With --fetch, the image's sha256 goes on the command line, which stage 1 checks the download against:
        # in a signed kernel image (a UKI) the command line is signed too, so the image is verified with it.
        cmdline = _cmdline(opts.format, init, " ".join(x for x in (
            params, image and f"{IMAGE_SHA256}={image['sha256']}") if x), opts.append)
        # The scratch directory (an erofs image's laid out root: tens of thousands of entries) goes while the
        # rest is written and the initrd hashed; all of it must be gone before the output is published.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netboot-scratch") as removal:
            removed = removal.submit(remove_tree, scratch)
            manifest = _finish(opts, work, kernel, cmdline, name, kernel_version, compressor, level, described,
                               secure, image)
            removed.result()
        for f in work.iterdir():
            f.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        initrd_size = manifest["artifacts"]["initrd"]["size"]
        if initrd_size > LARGE_INITRD:
            log.warning(
                "warning: the initrd is %.2f GiB; some firmware and iPXE fail to load initrds above 1 GiB, and "
                "iPXE cannot boot one above about 2 GiB (it places initrds below 4 GiB): build with --fetch "
                "(--format squashfs or erofs), so that the initrd holds stage 1 alone and stage 1 downloads "
                "the image", initrd_size / 2**30,
            )
        staging.commit()
    log.info(
        "built %s for %s: initrd %.1f MiB%s (%s%s) in %.1f s",
        opts.out, manifest["arch"], initrd_size / 2**20,
        f", image {image['size'] / 2**20:.1f} MiB" if image else "", compressor.name,
        f" -{level}" if level is not None else "", time.monotonic() - started,
    )
    return manifest


@dataclass(frozen=True)
class _SecureBoot:
    """What --sign-key and --uki add to a build."""

    signer: Signer | None
    osrel: bytes | None  # the unified kernel image's os-release; None: no --uki
    epoch: int  # the signing time and the image's timestamp

    def finish(self, work: Path, kernel: Kernel, cmdline: str) -> dict:
        """Sign the copied kernel, assemble (and sign) the UKI; what the manifest records of it."""
        copied = work / KERNEL_FILES[kernel.arch]  # as the loaders want it (an Image.gz unpacked)
        if self.osrel is not None:  # the kernel as built goes into the image, which is signed as a whole
            uki.write(work / UKI, copied, work / "initrd", cmdline, self.osrel, self.epoch, kernel.arch)
            if self.signer is not None:
                self.signer.sign(work / UKI, self.epoch)
        if self.signer is not None:
            self.signer.sign(copied, self.epoch)
        return {"signer": self.signer.describe()} if self.signer is not None else {}


def _signer(opts: BuildOptions, kernel: Path | None) -> Signer | None:
    """The key and certificate (both checked before anything is built), and a kernel that can be signed."""
    if kernel is not None and (opts.sign_key is not None or opts.uki):
        check_pe(kernel, "--sign-key" if opts.sign_key is not None else "--uki")
    if opts.sign_key is None or opts.sign_cert is None:
        return None
    return Signer.load(opts.sign_key, opts.sign_cert)


def _finish(opts: BuildOptions, work: Path, kernel: Kernel, cmdline: str, name: str, kernel_version: str | None,
            compressor: compress.Compressor, level: int | None, described: dict, secure: _SecureBoot,
            image: dict | None) -> dict:
    """The kernel, the command line, the iPXE script and the manifest, beside the initrd (and the UKI, the
    image)."""
    kernel_file = KERNEL_FILES[kernel.arch]
    kernel.copy_to(work / kernel_file)
    signed = secure.finish(work, kernel, cmdline)
    (work / "cmdline").write_text(cmdline + "\n")
    values = {"system": name, "format": opts.format, "cmdline": cmdline, "kernel": kernel_file}
    if image is None:
        script = render("netboot.ipxe", **values)
    else:
        script = render("netboot-fetch.ipxe", **values, image=IMAGE, fetch_args=fetch_args("${netboot-base}/" + IMAGE))
    (work / "netboot.ipxe").write_text(script)
    manifest = {
        "tool": "netboot",
        "version": __version__,
        "system": name,
        "arch": kernel.arch,
        "kernel_version": kernel_version,
        "format": opts.format,
        "compression": compressor.name,
        "level": level,
        "cmdline": cmdline,
        **described,
        **signed,
        "artifacts": {f: _describe(work / f) for f in (*files(kernel.arch), UKI)
                      if f != "manifest.json" and (work / f).exists()},
    }
    if image is not None:
        manifest["fetch"] = True
        manifest["artifacts"][IMAGE] = image
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _cmdline(fmt: str, init: str, params: str, append: str) -> str:
    # squashfs, erofs: stage 1 runs first and reads init=; direct: the kernel runs rdinit= from the initrd.
    key = "init" if fmt in IMAGE_FORMATS else "rdinit"
    cmdline = " ".join(x for x in (f"{key}={init}", params, append.strip()) if x)
    if "${" in cmdline:
        raise NetbootError("the kernel command line contains '${', which iPXE would expand as a setting")
    return cmdline


def _pack_nix(opts: BuildOptions, system: System, packing: Packing, cache: Cache, work: Path, scratch: Path
              ) -> dict:
    """A Nix system's initrd: its closure, in the format asked; what the manifest says of it."""
    closure = Closure.of(system.toplevel, opts.closure_info)
    # Refused before packing: an image format without the modules to mount it.
    stage1 = (Stage1.prepare(system, closure, opts.format, opts.busybox, fetch=opts.fetch)
              if opts.format in IMAGE_FORMATS else None)
    initrd = work / "initrd"
    fetched = work / IMAGE if opts.fetch else None
    if stage1 is not None:
        if opts.format == "erofs":
            stats = write_erofs(initrd, closure, stage1, packing, cache, scratch, fetched=fetched)
        else:
            stats = write_squashfs(initrd, closure, stage1, packing, cache, scratch, opts.progress, fetched=fetched)
        _log_stage1(stage1, opts)
    else:
        progress = Progress("packing", len(closure.paths), enabled=opts.progress)
        stats = write_direct(initrd, closure, packing, cache, scratch, progress)
        progress.done()
    reused = f"; {stats.reused} reused from the cache" if cache.enabled else ""
    log.info("closure: %d store paths, %d files, %.1f MiB%s", len(closure.paths), stats.files,
             stats.bytes / 2**20, reused)
    return {"input": {"kind": "nix"},
            "closure": {"paths": len(closure.paths), "files": stats.files, "bytes": stats.bytes}}


def _root_system(opts: BuildOptions, scratch: Path) -> rootfs.RootSystem:
    assert opts.kernel is not None
    kernel = Kernel.load(opts.kernel)
    if opts.oci is not None:
        unpacked = scratch / "oci-root"
        unpacked.mkdir()
        keep_owners = os.geteuid() == 0
        image = oci.unpack(opts.oci, unpacked, keep_owners=keep_owners, limits=opts.limits,
                           platform=oci.PLATFORMS[kernel.arch])
        if not keep_owners:
            log.warning("warning: not root: every file of %s is root's in the build, and device nodes are left "
                        "out", opts.oci)
        described = {"kind": "oci", "archive": str(opts.oci), "digest": image.digest, "layers": image.layers}
        return rootfs.RootSystem.load(unpacked, kernel, opts.init, opts.modules, input=described,
                                      all_root=not keep_owners)
    assert opts.rootfs is not None
    return rootfs.RootSystem.load(opts.rootfs, kernel, opts.init, opts.modules,
                                  input={"kind": "rootfs", "path": str(opts.rootfs)})


def _pack_root(opts: BuildOptions, root: rootfs.RootSystem, packing: Packing, work: Path, scratch: Path) -> dict:
    """Any other system's initrd: its root filesystem, in the format asked; what the manifest says of it."""
    initrd = work / "initrd"
    if opts.format in IMAGE_FORMATS:
        stage1 = root.stage1(opts.format, opts.busybox, fetch=opts.fetch)
        files, nbytes = rootfs.count(root.root, opts.limits)  # before mksquashfs or mkfs.erofs reads it
        rootfs.write_image(initrd, root, opts.format, packing, scratch, stage1, opts.progress,
                           fetched=work / IMAGE if opts.fetch else None)
        _log_stage1(stage1, opts)
    else:
        files, nbytes = rootfs.write_direct(initrd, root, packing, opts.limits)
    log.info("root filesystem: %d files, %.1f MiB%s", files, nbytes / 2**20,
             f"; modules {root.modules.version} added" if root.add_modules and root.modules else "")
    return {"input": root.input, "root": {"files": files, "bytes": nbytes}}


def _log_stage1(stage1: Stage1, opts: BuildOptions) -> None:
    log.info("stage 1: busybox from %s, modules %s", stage1.busybox,
             " ".join(p for p, _ in stage1.load_order) or "built in")
    if opts.sign_key is not None and (unsigned := stage1.unsigned_modules()):
        log.warning("warning: stage 1 loads modules that carry no signature (%s): with Secure Boot on, the kernel is "
                    "locked down and refuses them; sign them with the kernel's module key, or use --format direct",
                    ", ".join(unsigned))
    if stage1.network is not None:
        log.info("stage 1: %d network drivers and their dependencies (%d modules), loaded by modalias",
                 len(stage1.network.drivers), len(stage1.network.modules))


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
