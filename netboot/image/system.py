"""A built system's top-level directory: kernel, init, kernel parameters and kernel modules.

Layout of a NixOS toplevel (nixos/modules/system/activation/top-level.nix): `kernel` (bzImage),
`kernel-modules` (lib/modules/<version>/...), `kernel-params` (one line), `init` (stage 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from netboot.core.errors import NetbootError


@dataclass(frozen=True)
class System:
    toplevel: Path  # the real path, e.g. /nix/store/…-nixos-system-host-24.11
    kernel: Path
    init: Path  # as the kernel will see it: <toplevel>/init
    params: str
    modules: Path | None  # <toplevel>/kernel-modules, when present
    kernel_version: str | None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> System:
        given = Path(path)
        if not given.exists():
            raise NetbootError(f"system {given} does not exist")
        toplevel = given.resolve()
        if not toplevel.is_dir():
            raise NetbootError(f"system {given} is not a directory")
        kernel = toplevel / "kernel"
        if not kernel.is_file():
            raise NetbootError(f"system {given} has no kernel (expected a bzImage at {kernel})")
        init = toplevel / "init"
        if not init.exists():
            raise NetbootError(f"system {given} has no init (expected {init})")
        params_file = toplevel / "kernel-params"
        try:
            params = params_file.read_text().strip() if params_file.exists() else ""
        except (OSError, UnicodeDecodeError) as e:
            raise NetbootError(f"cannot read {params_file}: {e}") from e
        if "\n" in params:
            raise NetbootError(f"{params_file} holds more than one line")
        modules = toplevel / "kernel-modules"
        return cls(
            toplevel=toplevel,
            kernel=kernel,
            init=init,
            params=params,
            modules=modules if modules.is_dir() else None,
            kernel_version=bzimage_version(kernel),
        )


def is_bzimage(path: Path) -> bool:
    """Whether `path` starts like an x86 Linux kernel image: "HdrS" at 0x202 (Documentation/arch/x86/boot.rst)."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError as e:
        raise NetbootError(f"cannot read kernel {path}: {e.strerror}") from e
    return head[0x202:0x206] == b"HdrS"


def bzimage_version(path: Path) -> str | None:
    """The kernel release (`uname -r`) from a bzImage's setup header, or None if it isn't one.

    Documentation/arch/x86/boot.rst: "HdrS" at 0x202; the 16-bit kernel_version field at 0x20E points to a
    NUL-terminated string, 0x200 bytes before where it says.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(0x8000)
    except OSError as e:
        raise NetbootError(f"cannot read kernel {path}: {e.strerror}") from e
    if head[0x202:0x206] != b"HdrS":
        return None
    pointer = int.from_bytes(head[0x20E:0x210], "little")
    if pointer == 0:
        return None
    start = pointer + 0x200
    text = head[start : head.find(b"\0", start)]
    release = text.split(b" ", 1)[0].decode(errors="replace")
    return release or None
