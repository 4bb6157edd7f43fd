"""The signed loaders of the Secure Boot chains (shim → GRUB → kernel or UKI), per architecture.

Each architecture is one table entry: the names its UEFI firmware and shim ask for (shim fetches GRUB and
MokManager beside itself, by these names), the DHCP architectures (RFC 4578 option 93) of its clients, and
where Debian's packages put each file. `netboot serve --loaders ARCH=DIR` replaces Debian's files of one
architecture with a directory holding them under the firmware's names.

    ARCH     names                                        option 93        Debian
    x86_64   shimx64.efi grubx64.efi mmx64.efi            7, 9 (PXE) 16    shim-signed, grub-efi-amd64-signed, ...
    arm64    shimaa64.efi grubaa64.efi mmaa64.efi         11 (PXE) 19      shim-signed:arm64, grub-efi-arm64-signed

GRUB's own modules (`grub/<platform>/<name>.mod`) are served too, for the ones netboot's configuration loads
(`GRUB_MODULES`): a GRUB without Secure Boot loads them over the network; under Secure Boot GRUB loads none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from netboot.core.artifacts import DEFAULT_ARCH  # noqa: F401 (of a build that does not say otherwise)
from netboot.core.errors import NetbootError

LOADERS = ("ipxe", "grub", "uki")  # a profile's `loader`
SIGNED_CHAINS = ("grub", "uki")  # the loaders that boot through shim and GRUB
GRUB_MODULES = ("http",)  # what netboot's GRUB configuration may insmod (ipxe-scripts/*.grub)


@dataclass(frozen=True)
class Source:
    """Where a file comes from by default: a path and the Debian package that installs it."""

    path: Path
    package: str


@dataclass(frozen=True)
class Arch:
    name: str
    aliases: tuple[str, ...]
    efi: str  # the suffix of its firmware's file names: BOOTX64.EFI, shimx64.efi (UEFI 2.10 §3.5.1.1)
    grub_platform: str  # GRUB's name for it: the folder of its modules
    pxe_arches: tuple[int, ...]  # option 93 of its UEFI PXE clients
    http_arches: tuple[int, ...]  # option 93 of its UEFI HTTP Boot clients
    debian: dict[str, Source] = field(default_factory=dict)  # firmware file name -> Debian's file
    debian_modules: Source | None = None  # Debian's folder of GRUB's modules for this platform
    # The served name of the operator's iPXE for it (DIR/ipxe.efi of --loaders ARCH=DIR); None: Debian's ipxe
    # package has one (x86_64's ipxe.efi), or nothing does.
    ipxe: str | None = None

    @property
    def shim(self) -> str:
        return f"shim{self.efi}.efi"

    @property
    def grub(self) -> str:
        return f"grub{self.efi}.efi"

    @property
    def mokmanager(self) -> str:
        return f"mm{self.efi}.efi"

    @property
    def files(self) -> tuple[str, str, str]:
        return self.shim, self.grub, self.mokmanager

    def module(self, name: str) -> str:
        """A GRUB module's served name: GRUB asks for `$prefix/<platform>/<name>.mod`, `$prefix` being /grub."""
        return f"grub/{self.grub_platform}/{name}.mod"


_SHIM = Path("/usr/lib/shim")
ARCHES = (
    Arch("x86_64", ("amd64", "x64"), "x64", "x86_64-efi", (7, 9), (16,), {
        "shimx64.efi": Source(_SHIM / "shimx64.efi.signed", "shim-signed"),
        # Network GRUB: its prefix is (tftp,SERVER)/grub, where it reads grub/grub.cfg.
        "grubx64.efi": Source(Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"), "grub-efi-amd64-signed"),
        "mmx64.efi": Source(_SHIM / "mmx64.efi.signed", "shim-helpers-amd64-signed"),
    }, Source(Path("/usr/lib/grub/x86_64-efi"), "grub-efi-amd64-bin")),
    Arch("arm64", ("aarch64", "aa64"), "aa64", "arm64-efi", (11,), (19,), {
        "shimaa64.efi": Source(_SHIM / "shimaa64.efi.signed", "shim-signed:arm64"),
        "grubaa64.efi": Source(Path("/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed"), "grub-efi-arm64-signed"),
        "mmaa64.efi": Source(_SHIM / "mmaa64.efi.signed", "shim-helpers-arm64-signed"),
    }, Source(Path("/usr/lib/grub/arm64-efi"), "grub-efi-arm64-bin"), ipxe="arm64/ipxe.efi"),
)
_BY_NAME = {name: arch for arch in ARCHES for name in (arch.name, *arch.aliases)}


def arch(name: str) -> Arch:
    found = _BY_NAME.get(name.lower())
    if found is None:
        raise NetbootError(f"unknown architecture {name!r} (expected {', '.join(a.name for a in ARCHES)}, or "
                           f"{', '.join(x for a in ARCHES for x in a.aliases)})")
    return found


def machine_arch(name: str) -> str | None:
    """The architecture of a client by the name its loader gives its own build (iPXE's ${buildarch}, GRUB's
    $grub_cpu), or None for one netboot has no builds for. iPXE for BIOS (undionly.kpxe) is built for i386 and
    runs on x86_64 machines, which is what BIOS network boots are: i386 counts as x86_64."""
    if name == "i386":
        return "x86_64"
    found = _BY_NAME.get(name.lower())
    return found.name if found is not None else None


def for_client(option93: int | None) -> tuple[Arch, bool] | None:
    """The architecture of a UEFI client by its option 93, and whether it boots over HTTP; None if none fits."""
    for a in ARCHES:
        if option93 in a.pxe_arches:
            return a, False
        if option93 in a.http_arches:
            return a, True
    return None


def parse_option(text: str) -> tuple[Arch, Path]:
    """`--loaders ARCH=DIR`."""
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise NetbootError(f"--loaders {text!r}: expected ARCH=DIR, e.g. x86_64=/srv/loaders")
    found = arch(name)
    path = Path(directory)
    if not path.is_dir():
        raise NetbootError(f"--loaders {text!r}: {directory} is not a directory")
    return found, path.absolute()


_MODULE_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Loaders:
    """Where each architecture's loaders are: Debian's files, or a directory given with --loaders."""

    dirs: dict[str, Path] = field(default_factory=dict)  # arch name -> --loaders DIR

    @classmethod
    def from_options(cls, options: list[str]) -> Loaders:
        dirs: dict[str, Path] = {}
        for text in options:
            found, path = parse_option(text)
            if found.name in dirs:
                raise NetbootError(f"--loaders {found.name} is given twice")
            dirs[found.name] = path
        return cls(dirs)

    def sources(self, a: Arch) -> dict[str, Source]:
        """Each firmware file of `a` and where it comes from."""
        given = self.dirs.get(a.name)
        if given is None:
            return dict(a.debian)
        return {name: Source(given / name, f"--loaders {a.name}={given}") for name in a.files}

    def modules(self, a: Arch) -> dict[str, Path]:
        """The GRUB modules of GRUB_MODULES that are present, by served name: Debian's, or DIR/<platform>/."""
        given = self.dirs.get(a.name)
        folder = given / a.grub_platform if given is not None else a.debian_modules.path if a.debian_modules else None
        if folder is None:
            return {}
        found = {}
        for name in GRUB_MODULES:
            assert _MODULE_NAME.fullmatch(name)
            if (folder / f"{name}.mod").is_file():
                found[a.module(name)] = folder / f"{name}.mod"
        return found

    def served(self) -> dict[str, Path]:
        """Every loader file present, by served name (the firmware's file name, or grub/<platform>/<m>.mod)."""
        files: dict[str, Path] = {}
        for a in ARCHES:
            files.update({name: s.path for name, s in self.sources(a).items() if s.path.is_file()})
            files.update(self.modules(a))
            given = self.dirs.get(a.name)
            if a.ipxe is not None and given is not None and (given / "ipxe.efi").is_file():
                files[a.ipxe] = given / "ipxe.efi"
        return files

    def missing(self, a: Arch) -> str | None:
        """Why the chain of `a` cannot be served (one line naming the file and its package), or None."""
        for name, source in self.sources(a).items():
            if not source.path.is_file():
                if source.package.startswith("--loaders"):
                    return f"{source.path} is missing (the {name} of {source.package})"
                return f"{source.path} is missing (install Debian's {source.package}, or give --loaders {a.name}=DIR " \
                       f"with {name})"
        return None
