"""The small stage 1 of the squashfs and erofs formats: static busybox, the modules it needs, and its init script.

With --fetch, stage 1 also carries the network drivers (network_drivers.py) and what it needs to download the
image: its name and size (etc/netboot-image); its sha256 is on the kernel command line (pack.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from netboot.core.errors import NetbootError
from netboot.image.closure import Closure
from netboot.image.elf import ElfHeader, read_header
from netboot.image.modules import ModuleTree, is_signed, module_name, uncompressed_name
from netboot.image.network_drivers import NetworkDrivers
from netboot.image.system import System
from netboot.image.tree import Tree

log = logging.getLogger(__name__)

HOST_BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
DEBIAN_ARCH = {"x86_64": "amd64", "arm64": "arm64"}  # dpkg's names for core/artifacts.ARCHES


@dataclass(frozen=True)
class FetchedImage:
    """What stage 1 knows of the image it downloads (etc/netboot-image): the name it mounts it by, its size, and
    its first byte (busybox wget accepts a part of a file, a 206 answer, only after the first byte; see
    stage1-init.sh). Its sha256 is on the kernel command line."""

    name: str
    size: int
    first: int

    @classmethod
    def of(cls, name: str, image: int) -> FetchedImage:
        """The image open at `image`."""
        return cls(name, os.fstat(image).st_size, os.pread(image, 1, 0)[0])


def needed_modules(fstype: str) -> list[str]:
    """What mounting an image file under an overlay takes (for squashfs, what nixpkgs' netboot.nix loads too)."""
    return ["loop", fstype, "overlay"]


@dataclass(frozen=True)
class Stage1:
    busybox: Path
    modules: ModuleTree
    load_order: tuple[tuple[str, bool], ...]  # (path relative to the module tree, optional), dependencies first
    network: NetworkDrivers | None = None  # --fetch: the network drivers, loaded by modalias
    image: FetchedImage | None = None  # --fetch: the image stage 1 downloads

    @classmethod
    def prepare(cls, system: System, closure: Closure, fstype: str, busybox: Path | None = None, *,
                fetch: bool = False) -> Stage1:
        if system.modules is None:
            raise NetbootError(
                f"system {system.toplevel} has no kernel-modules; the {fstype} format needs "
                f"{', '.join(needed_modules(fstype))} (or use --format direct)"
            )
        return cls.of(ModuleTree.load(system.modules, system.kernel_version), fstype,
                      find_busybox([p / "bin" / "busybox" for p in closure.paths], system.arch, busybox),
                      fetch=fetch)

    @classmethod
    def of(cls, modules: ModuleTree, fstype: str, busybox: Path, *, fetch: bool = False) -> Stage1:
        return cls(busybox, modules, tuple(modules.resolve(needed_modules(fstype), f"the {fstype} format")),
                   NetworkDrivers.of(modules) if fetch else None)

    def unsigned_modules(self) -> list[str]:
        """The modules stage 1 loads that carry no signature, which a kernel locked down by Secure Boot refuses."""
        return [module_name(relpath) for relpath, _ in self.load_order
                if not is_signed(self.modules.read_uncompressed(relpath))]

    def tree(self) -> Tree:
        """The stage 1 files, by name inside the initrd."""
        t = Tree()
        t.file(b"init", files("netboot.image").joinpath("stage1-init.sh").read_bytes(), 0o755)
        t.file(b"bin/busybox", _read(self.busybox), 0o755)
        t.char_device(b"dev/console", 0o600, 5, 1)
        loaded = []
        for relpath, optional in self.load_order:
            name = os.fsencode(f"lib/modules/{self.modules.version}/{uncompressed_name(relpath)}")
            t.file(name, self.modules.read_uncompressed(relpath), 0o444)
            loaded.append(b"optional " + name if optional else name)
        t.file(b"etc/netboot-modules", b"".join(n + b"\n" for n in loaded), 0o444)
        if self.network is not None:
            for name, relpath in self.network.files():
                t.file(name, self.modules.read_uncompressed(relpath), 0o444)
            where = os.fsencode(f"lib/modules/{self.modules.version}")
            t.file(where + b"/modules.dep", self.network.modules_dep(), 0o444)
            t.file(where + b"/modules.alias", self.network.modules_alias(), 0o444)
        if self.image is not None:
            t.file(b"etc/netboot-image", f"{self.image.name} {self.image.size} {self.image.first}\n".encode(), 0o444)
        for mountpoint in (b"proc", b"sys", b"mnt-root"):
            t.directory(mountpoint)
        return t


def find_busybox(candidates: list[Path], arch: str, given: Path | None = None) -> Path:
    """Stage 1's busybox, static and for the kernel's `arch`: `given` (--busybox) after checking it, else the
    system's own, else Debian's busybox-static on this machine when it is for `arch` (never one for another
    architecture: the kernel could not run it, and stage 1 would die with its first command)."""
    if given is not None:
        header = _header(given, "--busybox")
        if header is None:
            raise NetbootError(f"--busybox {given} is not an ELF program")
        if header.dynamic:
            raise NetbootError(f"--busybox {given} is dynamically linked, and stage 1 holds no libraries: give a "
                               f"static busybox (Debian's busybox-static:{DEBIAN_ARCH[arch]})")
        if header.arch != arch:
            raise NetbootError(f"--busybox {given} is for {header.arch}, but the kernel is {arch}")
        return given
    passed = []
    for candidate in [*candidates, HOST_BUSYBOX]:
        if not candidate.is_file():
            continue
        header = _header(candidate, "busybox")
        if header is not None and header.arch == arch and not header.dynamic:
            for skipped in passed:
                log.info("stage 1: not %s", skipped)
            return candidate
        passed.append(f"{candidate}, {header.what if header else 'not an ELF program'}")
    seen = f" (not {'; nor '.join(passed)})" if passed else ""
    raise NetbootError(f"no static {arch} busybox for stage 1{seen}: add one to the system, or give --busybox PATH "
                       f"(Debian's busybox-static:{DEBIAN_ARCH[arch]} has one)")


def _header(path: Path, what: str) -> ElfHeader | None:
    try:
        return read_header(path)
    except OSError as e:
        raise NetbootError(f"cannot read {what} {path}: {e.strerror}") from e


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise NetbootError(f"cannot read {path}: {e.strerror}") from e
