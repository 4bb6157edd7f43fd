"""The small stage 1 of the squashfs and erofs formats: static busybox, the modules it needs, and its init script.

With --fetch, stage 1 also carries the network drivers (network_drivers.py) and what it needs to download the
image: its name and size (etc/netboot-image); its sha256 is on the kernel command line (pack.py).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from netboot.core.errors import NetbootError
from netboot.image.closure import Closure
from netboot.image.modules import ModuleTree, uncompressed_name
from netboot.image.network_drivers import NetworkDrivers
from netboot.image.system import System
from netboot.image.tree import Tree

HOST_BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static


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
    def prepare(cls, system: System, closure: Closure, fstype: str, *, fetch: bool = False) -> Stage1:
        if system.modules is None:
            raise NetbootError(
                f"system {system.toplevel} has no kernel-modules; the {fstype} format needs "
                f"{', '.join(needed_modules(fstype))} (or use --format direct)"
            )
        return cls.of(ModuleTree.load(system.modules, system.kernel_version), fstype,
                      find_busybox([p / "bin" / "busybox" for p in closure.paths]), fetch=fetch)

    @classmethod
    def of(cls, modules: ModuleTree, fstype: str, busybox: Path, *, fetch: bool = False) -> Stage1:
        return cls(busybox, modules, tuple(modules.resolve(needed_modules(fstype), f"the {fstype} format")),
                   NetworkDrivers.of(modules) if fetch else None)

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


def find_busybox(candidates: list[Path]) -> Path:
    """A static busybox: the system's own when it has one, else Debian's busybox-static."""
    for candidate in candidates:
        if candidate.is_file() and is_static_elf(candidate):
            return candidate
    if HOST_BUSYBOX.is_file() and is_static_elf(HOST_BUSYBOX):
        return HOST_BUSYBOX
    raise NetbootError(
        "no static busybox for stage 1: install Debian's busybox-static, or add a static busybox to the system"
    )


def is_static_elf(path: Path) -> bool:
    """True for a 64-bit ELF executable without a PT_INTERP program header (no dynamic loader)."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2:
                return False
            order = "<" if ident[5] == 1 else ">"
            phoff, = struct.unpack_from(order + "Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(
        struct.unpack_from(order + "I", table, i * phentsize)[0] != pt_interp for i in range(phnum)
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise NetbootError(f"cannot read {path}: {e.strerror}") from e
