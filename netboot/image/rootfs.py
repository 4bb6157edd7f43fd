"""Systems that are not Nix's: a root filesystem directory (debootstrap's, an unpacked container's, or an OCI
image unpacked by oci.py) booted with a kernel given apart.

The root's files keep their owners, modes, device nodes and FIFOs as they are on disk (all root's with
`all_root`, for a root unpacked without the right to set owners); hard links become separate files in the
direct format, as everywhere in netboot's initrds. Kernel modules given with --modules are added to the booted
root at lib/modules/<version>, and serve stage 1; without them, stage 1 takes the root's own, looked up inside
the root as the booted system would (a symlink out of it leads back into it, never to this machine's files).
The root is counted against the image limits (limits.py) before it is packed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from netboot.core.artifacts import STAGE1_PREFIX
from netboot.core.errors import NetbootError
from netboot.image.cpio import NewcWriter
from netboot.image.erofs import mkfs_erofs
from netboot.image.files import lstat
from netboot.image.initrd import Packing, append_stage1, compressed_output, write_image_member
from netboot.image.kernel import Kernel
from netboot.image.limits import ImageLimits, LimitError, Tally, check_name, shown
from netboot.image.modules import Locate, ModuleTree, version_dir
from netboot.image.squashfs import mksquashfs_root
from netboot.image.stage1 import FetchedImage, Stage1, find_busybox
from netboot.image.tree import Tree

_MAX_LINKS = 40  # symlinks followed while resolving a path inside the root, as the kernel allows


@dataclass(frozen=True)
class RootSystem:
    root: Path
    kernel: Kernel  # recognised (kernel.py): its architecture chooses stage 1's busybox
    kernel_version: str | None
    init: str  # absolute, inside the root
    modules: ModuleTree | None  # --modules, else the root's own for this kernel, else None
    add_modules: bool  # --modules given: they go into the booted root
    all_root: bool
    input: dict  # what the manifest says the input was

    @classmethod
    def load(cls, root: Path, kernel: Kernel, init: str, modules: Path | None, *, input: dict,
             all_root: bool = False) -> RootSystem:
        if not root.is_dir():
            raise NetbootError(f"root filesystem {root} {'is not a directory' if root.exists() else 'does not exist'}")
        version = kernel.version
        if not init.startswith("/"):
            raise NetbootError(f"--init {init} is not an absolute path")
        found = resolve_in_root(root, init)
        if found is None or not os.path.lexists(root / found):
            raise NetbootError(f"init {init} is not in the root filesystem {root}")
        st = os.stat(root / found, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            raise NetbootError(f"init {init} in {root} is not an executable file")
        if modules is not None:
            if (modules / "modules.dep").is_file():
                chosen = modules
            else:
                base = modules / "lib" / "modules" if (modules / "lib" / "modules").is_dir() else modules
                chosen = version_dir(base, version, f"--modules {modules} has no modules.dep "
                                     "(give a directory like /lib/modules/<version>)")
            if version is not None and chosen.name != version:
                raise NetbootError(f"--modules {chosen} is for kernel {chosen.name}, but the kernel is {version}")
            tree: ModuleTree | None = ModuleTree.at(chosen)
        else:
            own = resolve_in_root(root, f"/lib/modules/{version}") if version else None
            locate = _inside(root, own) if own else None
            tree = ModuleTree.at(root / own, locate) if own and locate and locate("modules.dep") else None
        return cls(root, kernel, version, init, tree, modules is not None, all_root, input)

    def stage1(self, fstype: str, busybox: Path | None = None, *, fetch: bool = False) -> Stage1:
        if self.modules is None:
            raise NetbootError(
                f"the {fstype} format needs the kernel's loop, {fstype} and overlay modules: give --modules DIR, "
                f"or a root with lib/modules/{self.kernel_version or '<version>'} (or use --format direct)"
            )
        found = (resolve_in_root(self.root, p) for p in ("/bin/busybox", "/usr/bin/busybox", "/sbin/busybox"))
        return Stage1.of(self.modules, fstype, find_busybox([self.root / p for p in found if p], self.kernel.arch,
                                                             busybox), fetch=fetch)

    def modules_destination(self) -> bytes:
        """Where the modules go in the root, its symlinks resolved (/lib is often a link to usr/lib)."""
        assert self.modules is not None
        parent = resolve_in_root(self.root, "/lib/modules") or "lib/modules"
        return os.fsencode(f"{parent}/{self.modules.version}")


def resolve_in_root(root: Path, path: str) -> str | None:
    """`path` with the root's symlinks followed as the booted system would (an absolute target starts at the
    root), relative to the root; None when a link loops or a component is not a directory. The last component
    need not exist."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        here = root.joinpath(*resolved, name)
        if here.is_symlink():
            links += 1
            if links > _MAX_LINKS:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        if parts and not here.is_dir():
            return None
        resolved.append(name)
    return "/".join(resolved)


def _inside(root: Path, tree: str) -> Locate:
    """Where a file of the module tree `tree` (relative to the root) is, found inside the root as the booted
    system would find it; None when it is not there. Anything but a regular file is refused: a FIFO would
    hang the build."""

    def locate(relpath: str) -> Path | None:
        named = relpath if relpath.startswith("/") else f"/{tree}/{relpath}"
        found = resolve_in_root(root, named)
        if found is None or not os.path.lexists(root / found):
            return None
        if not stat.S_ISREG(lstat(os.fsencode(root / found)).st_mode):
            raise NetbootError(f"{shown(named)} in the root filesystem {root} is not a regular file")
        return root / found

    return locate


def write_direct(path: Path, system: RootSystem, packing: Packing, limits: ImageLimits) -> tuple[int, int]:
    """The direct format: the console, then the whole root, then the added modules; (files, bytes)."""
    with compressed_output(path, packing) as fd:
        w = NewcWriter(fd, packing.mtime)
        lead = Tree()
        lead.char_device(b"dev/console", 0o600, 5, 1)  # the kernel opens it for init; the root's own wins
        lead.write(w)
        files, nbytes = write_tree(w, system.root, b"", all_root=system.all_root, tally=Tally(limits))
        w.trailer()
    if system.add_modules:
        _append_modules(path, system, packing, b"")
    return files, nbytes


def write_image(path: Path, system: RootSystem, fstype: str, packing: Packing, scratch: Path, stage1: Stage1,
                show_progress: bool, *, fetched: Path | None = None) -> None:
    """An image format: the root as one image, stage 1, and the added modules (copied in by stage 1); with
    `fetched`, the image goes there as a file of its own and the initrd holds the rest."""
    image = scratch / f"root.{fstype}"
    if fstype == "erofs":
        mkfs_erofs(system.root, image, packing.compressor, packing.level, packing.mtime,
                   identity=_identity(system), all_root=system.all_root, xattrs=True)
    else:
        mksquashfs_root(system.root, image, packing.compressor, packing.level, packing.explicit_level,
                        packing.mtime, all_root=system.all_root, show_progress=show_progress)
    if fetched is not None:
        with open(image, "rb") as f:
            stage1 = replace(stage1, image=FetchedImage.of(image.name, f.fileno()))
        image.rename(fetched)  # the scratch directory is beside the output's files: no copy
    else:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            write_image_member(path, os.fsencode(image.name), fd, packing)
        finally:
            os.close(fd)
        image.unlink()
    append_stage1(path, stage1, packing)
    if system.add_modules:
        _append_modules(path, system, packing, STAGE1_PREFIX.encode() + b"/")


def _append_modules(path: Path, system: RootSystem, packing: Packing, prefix: bytes) -> None:
    assert system.modules is not None
    dest = system.modules_destination()
    with compressed_output(path, packing, append=True) as fd:
        w = NewcWriter(fd, packing.mtime)
        parts = (prefix + dest).split(b"/")
        for i in range(1, len(parts)):
            parent = b"/".join(parts[:i])
            # The kernel sets a directory's owner and mode again when it meets it again: only missing ones.
            if prefix or not os.path.lexists(os.path.join(os.fsencode(system.root), parent)):
                w.directory(parent, 0o755)
        write_tree(w, system.modules.root, prefix + dest, all_root=True)
        w.trailer()


def write_tree(w: NewcWriter, src: Path, dest: bytes, *, all_root: bool, tally: Tally | None = None
               ) -> tuple[int, int]:
    """Everything below `src`, named under `dest` (b"": at the top of the archive), each directory before its
    contents, and `dest` itself when named; (files, bytes). With a tally, within its limits."""
    files = nbytes = 0
    for path, rel, st in _walk(os.fsencode(src), tally):
        if not rel and not dest:
            continue  # the root directory: the initramfs itself
        name = dest + b"/" + rel if dest and rel else dest or rel
        owner = (0, 0) if all_root else (st.st_uid, st.st_gid)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            w.file(name, path, stat.S_IMODE(mode), st.st_size, owner)
            files += 1
            nbytes += st.st_size
        elif stat.S_ISDIR(mode):
            w.directory(name, stat.S_IMODE(mode), owner)
        elif stat.S_ISLNK(mode):
            w.symlink(name, os.readlink(path), owner)
        else:  # a device node, FIFO or socket
            w.special(name, mode, (os.major(st.st_rdev), os.minor(st.st_rdev)), owner)
    return files, nbytes


def count(root: Path, limits: ImageLimits) -> tuple[int, int]:
    """The root's regular files and their bytes, within `limits`."""
    files = nbytes = 0
    for _, _, st in _walk(os.fsencode(root), Tally(limits)):
        if stat.S_ISREG(st.st_mode):
            files += 1
            nbytes += st.st_size
    return files, nbytes


def _walk(top: bytes, tally: Tally | None = None) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """(path, path relative to `top`, lstat) of `top` and everything below it, children sorted by name; with a
    tally, each entry counted against its limits before it is yielded (and a directory before it is read)."""
    stack = [(top, b"", lstat(top))]
    while stack:
        path, rel, st = stack.pop()
        if tally is not None and rel:
            try:
                check_name(rel, rel.count(b"/") + 1)
                tally.entry()
                if stat.S_ISREG(st.st_mode):
                    tally.spend(st.st_size)
            except LimitError as e:
                raise LimitError(f"root filesystem {os.fsdecode(top)}: {shown(rel)}: {e}") from None
        yield path, rel, st
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as it:
                    children = sorted((d.name, d.path, d.stat(follow_symlinks=False)) for d in it)
            except OSError as e:
                raise NetbootError(f"cannot read {os.fsdecode(path)}: {e.strerror}") from e
            stack.extend((p, rel + b"/" + n if rel else n, s) for n, p, s in reversed(children))


def _identity(system: RootSystem) -> str:
    """What the erofs UUID is derived from: the OCI image's digest, else the root's path and the kernel."""
    source = system.input.get("digest") or system.input.get("path")
    return hashlib.sha256(json.dumps([source, system.kernel_version]).encode()).hexdigest()
