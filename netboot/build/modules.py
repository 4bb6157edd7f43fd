"""Kernel modules a stage 1 must load, resolved from the system's own modules.dep and modules.builtin."""

from __future__ import annotations

import gzip
import lzma
import re
from dataclasses import dataclass
from pathlib import Path

from netboot.errors import NetbootError
from netboot.run import require, run

_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def module_name(relpath: str) -> str:
    """`kernel/fs/overlayfs/overlay.ko.xz` → `overlay`; dashes and underscores are the same to the kernel."""
    return _SUFFIX.sub("", relpath.rsplit("/", 1)[-1]).replace("-", "_")


@dataclass(frozen=True)
class ModuleTree:
    root: Path  # …/lib/modules/<version>
    version: str
    deps: dict[str, tuple[str, tuple[str, ...]]]  # name → (relative path, transitive dependencies' paths)
    builtin: frozenset[str]

    @classmethod
    def load(cls, kernel_modules: Path, version: str | None) -> ModuleTree:
        base = kernel_modules / "lib" / "modules"
        try:
            versions = sorted(p.name for p in base.iterdir() if (p / "modules.dep").is_file())
        except OSError:
            versions = []
        if not versions:
            raise NetbootError(f"{kernel_modules} has no lib/modules/<version>/modules.dep")
        if version in versions:
            chosen = version
        elif len(versions) == 1:
            chosen = versions[0]
        else:
            raise NetbootError(
                f"{base} holds modules for {', '.join(versions)} but the kernel is {version or 'of unknown version'}"
            )
        root = base / chosen
        deps: dict[str, tuple[str, tuple[str, ...]]] = {}
        for line in _read_lines(root / "modules.dep"):
            target, _, rest = line.partition(":")
            if target:
                deps[module_name(target)] = (target, tuple(rest.split()))
        builtin_file = root / "modules.builtin"
        builtin = frozenset(module_name(x) for x in _read_lines(builtin_file)) if builtin_file.exists() else frozenset()
        return cls(root, chosen, deps, builtin)

    def resolve(self, wanted: list[str], purpose: str) -> list[str]:
        """Relative paths of the modules to insmod, dependencies first; built-in modules need nothing."""
        order: list[str] = []
        for name in (w.replace("-", "_") for w in wanted):
            if name in self.builtin:
                continue
            if name not in self.deps:
                raise NetbootError(
                    f"kernel {self.version} has no module {name!r}, built in or loadable (needed by {purpose})"
                )
            target, dependencies = self.deps[name]
            # depmod lists every transitive dependency, each before the ones it depends on;
            # modprobe loads them from the last to the first, then the module itself.
            for path in (*reversed(dependencies), target):
                if path not in order:
                    order.append(path)
        return order

    def read_uncompressed(self, relpath: str) -> bytes:
        """A module's ELF bytes; busybox insmod cannot load .ko.xz / .ko.zst / .ko.gz, so they are unpacked here."""
        path = self.root / relpath if not relpath.startswith("/") else Path(relpath)
        try:
            if relpath.endswith(".xz"):
                return lzma.decompress(path.read_bytes())
            if relpath.endswith(".gz"):
                return gzip.decompress(path.read_bytes())
            if relpath.endswith(".zst"):
                zstd = require("zstd", "needed to unpack .ko.zst modules")
                return run([zstd, "-q", "-d", "-c", str(path)], what=f"unpacking {path.name}").stdout
            return path.read_bytes()
        except OSError as e:
            raise NetbootError(f"cannot read module {path}: {e.strerror}") from e
        except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as e:
            raise NetbootError(f"module {path} is corrupt: {e}") from e


def uncompressed_name(relpath: str) -> str:
    return _SUFFIX.sub(".ko", relpath)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="surrogateescape").splitlines()
    except OSError as e:
        raise NetbootError(f"cannot read {path}: {e.strerror}") from e
