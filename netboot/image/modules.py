"""Kernel modules a stage 1 must load, resolved from the system's own modules.dep and modules.builtin."""

from __future__ import annotations

import contextlib
import gzip
import logging
import lzma
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

from netboot.core.errors import NetbootError

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")
# A module tree may come from an untrusted image: what is read of it is bounded. A distribution kernel's
# largest index (modules.alias) is about 1.5 MiB, its largest module (amdgpu) about 20 MiB unpacked.
_MAX_INDEX = 64 << 20
_MAX_MODULE = 256 << 20

# Where a file of a module tree, named relative to the tree (or absolute, as older depmod wrote modules.dep),
# is on this machine; None when it is not there.
Locate = Callable[[str], Path | None]


def module_name(relpath: str) -> str:
    """`kernel/fs/overlayfs/overlay.ko.xz` → `overlay`; dashes and underscores are the same to the kernel."""
    return _SUFFIX.sub("", relpath.rsplit("/", 1)[-1]).replace("-", "_")


@dataclass(frozen=True)
class ModuleTree:
    root: Path  # …/lib/modules/<version>
    version: str
    deps: dict[str, tuple[str, tuple[str, ...]]]  # name → (relative path, transitive dependencies' paths)
    builtin: frozenset[str]
    softdeps: dict[str, tuple[str, ...]]  # name → what modprobe loads before it ("pre:"), names or aliases
    aliases: dict[str, tuple[str, ...]]  # alias → module names, loadable or built in
    locate: Locate  # as named by default; for a tree inside a root filesystem, looked up inside it (rootfs.py)

    @classmethod
    def load(cls, kernel_modules: Path, version: str | None) -> ModuleTree:
        """The modules under `kernel_modules`/lib/modules (a NixOS system's kernel-modules) for `version`."""
        return cls.at(version_dir(kernel_modules / "lib" / "modules", version, f"{kernel_modules} has no "
                                  "lib/modules/<version>/modules.dep"))

    @classmethod
    def at(cls, root: Path, locate: Locate | None = None) -> ModuleTree:
        """The modules of one kernel version: `root` is like /lib/modules/<version>."""
        locate = locate or _as_named(root)
        chosen = root.name
        deps: dict[str, tuple[str, tuple[str, ...]]] = {}
        for line in _lines(root, locate, "modules.dep", required=True):
            target, _, rest = line.partition(":")
            if target:
                deps[module_name(target)] = (target, tuple(rest.split()))
        builtin = frozenset(module_name(x) for x in _lines(root, locate, "modules.builtin"))
        softdeps: dict[str, tuple[str, ...]] = {}
        for line in _lines(root, locate, "modules.softdep"):  # "softdep libcrc32c pre: crc32c post: ..."
            words = line.split()
            if len(words) > 2 and words[0] == "softdep":
                pre = words[2:words.index("post:")] if "post:" in words else words[2:]
                # depmod writes a line per "softdep=" of a module; modprobe (kmod 30) heeds the first.
                softdeps.setdefault(words[1].replace("-", "_"), tuple(w for w in pre if w != "pre:"))
        aliases: dict[str, list[str]] = {}
        for line in _lines(root, locate, "modules.alias"):  # "alias crc32c crc32c_generic"
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                aliases.setdefault(words[1], []).append(words[2].replace("-", "_"))
        # Built-in modules' aliases are in modules.builtin.modinfo (kbuild, Linux 5.2+): "name.alias=value\0".
        for record in _text(root, locate, "modules.builtin.modinfo").split("\0"):
            name, _, field = record.partition(".")
            key, _, value = field.partition("=")
            if key == "alias" and value:
                aliases.setdefault(value, []).append(name.replace("-", "_"))
        return cls(root, chosen, deps, builtin, softdeps, {k: tuple(v) for k, v in aliases.items()}, locate)

    def resolve(self, wanted: list[str], purpose: str) -> list[tuple[str, bool]]:
        """The modules to insmod, dependencies first, as (relative path, optional); built-in modules need
        nothing. A module's soft dependencies come before it, optional: modprobe loads them when it can
        (libcrc32c wants crc32c, which may be crc32c_intel, a module that refuses a CPU without SSE 4.2)."""
        order: dict[str, bool] = {}  # in load order
        seen: set[str] = set()
        missing: dict[tuple[str, str], None] = {}  # (module, soft dependency) that the kernel has in no form

        def add(name: str, optional: bool) -> None:
            target, dependencies = self.deps[name]
            # depmod lists every transitive dependency, each before the ones it depends on;
            # modprobe loads them from the last to the first, then the module itself.
            for path in (*reversed(dependencies), target):
                if path not in seen:
                    seen.add(path)
                    for soft in self.softdeps.get(module_name(path), ()):
                        candidates = self.aliases.get(soft, (soft.replace("-", "_"),))
                        if not any(c in self.deps or c in self.builtin for c in candidates):
                            missing[module_name(path), soft] = None
                        for candidate in candidates:
                            if candidate in self.deps and candidate not in self.builtin:
                                add(candidate, True)
                order[path] = order.get(path, True) and optional

        for name in (w.replace("-", "_") for w in wanted):
            if name in self.builtin:
                continue
            if name not in self.deps:
                raise NetbootError(
                    f"kernel {self.version} has no module {name!r}, built in or loadable (needed by {purpose})"
                )
            add(name, False)
        for module, soft in missing:
            # libcrc32c → crc32c: without any crc32c, erofs fails to mount (its checksums need it).
            log.warning("warning: module %s needs %s loaded first (a soft dependency), which kernel %s has neither "
                        "as a module nor built in: %s may not boot", module, soft, self.version, purpose)
        return list(order.items())

    def read_uncompressed(self, relpath: str) -> bytes:
        """A module's ELF bytes; busybox insmod cannot load .ko.xz / .ko.zst / .ko.gz, so they are unpacked here."""
        path = self.locate(relpath)
        if path is None:
            raise NetbootError(f"cannot read module {self.root / relpath}: it is not there")
        try:
            with open(path, "rb") as raw, _unpacking(relpath, raw) as f:
                data = f.read(_MAX_MODULE + 1)
        except OSError as e:
            if e.errno is None:  # gzip's BadGzipFile
                raise NetbootError(f"module {path} is corrupt: {e}") from e
            raise NetbootError(f"cannot read module {path}: {e.strerror}") from e
        except (lzma.LZMAError, zlib.error, EOFError, zstandard.ZstdError) as e:
            raise NetbootError(f"module {path} is corrupt: {e}") from e
        if len(data) > _MAX_MODULE:
            raise NetbootError(f"module {path} unpacks to more than {_MAX_MODULE >> 20} MiB")
        return data


# What module signing appends to a module (scripts/sign-file.c; include/linux/module_signature.h): under Secure
# Boot a locked-down kernel loads no module without it.
SIGNATURE_MAGIC = b"~Module signature appended~\n"


def is_signed(module: bytes) -> bool:
    return module.endswith(SIGNATURE_MAGIC)


def version_dir(base: Path, version: str | None, missing: str) -> Path:
    """The directory of `base` (like /lib/modules) for the kernel `version`, or its only one."""
    try:
        versions = sorted(p.name for p in base.iterdir() if (p / "modules.dep").is_file())
    except OSError:
        versions = []
    if not versions:
        raise NetbootError(missing)
    if version in versions:
        return base / version
    if len(versions) == 1:
        return base / versions[0]
    raise NetbootError(f"{base} holds modules for {', '.join(versions)} but the kernel is "
                       f"{version or 'of unknown version'}")


def uncompressed_name(relpath: str) -> str:
    return _SUFFIX.sub(".ko", relpath)


def _unpacking(relpath: str, raw: IO[bytes]) -> contextlib.AbstractContextManager[IO[bytes]]:
    """The module's bytes, read through the decompressor its name says, as they are read."""
    if relpath.endswith(".xz"):
        return lzma.LZMAFile(raw)
    if relpath.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if relpath.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return contextlib.nullcontext(raw)


def _as_named(root: Path) -> Locate:
    def locate(relpath: str) -> Path | None:
        path = root / relpath  # an absolute relpath stays as it is
        return path if path.exists() else None

    return locate


def _lines(root: Path, locate: Locate, name: str, *, required: bool = False) -> list[str]:
    return _text(root, locate, name, required=required).splitlines()


def _text(root: Path, locate: Locate, name: str, *, required: bool = False) -> str:
    """An index file of the tree; "" when it is missing and not `required`."""
    path = locate(name)
    if path is None:
        if required:
            raise NetbootError(f"cannot read {root / name}: No such file or directory")
        return ""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_INDEX + 1)
    except OSError as e:
        raise NetbootError(f"cannot read {path}: {e.strerror}") from e
    if len(data) > _MAX_INDEX:
        raise NetbootError(f"{path} is larger than {_MAX_INDEX >> 20} MiB")
    return data.decode(errors="surrogateescape")
