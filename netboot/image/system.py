"""A built system's top-level directory: kernel, init, kernel parameters and kernel modules.

Layout of a NixOS toplevel (nixos/modules/system/activation/top-level.nix): `kernel` (bzImage, or Image on arm64),
`kernel-modules` (lib/modules/<version>/...), `kernel-params` (one line), `init` (stage 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from netboot.core.errors import NetbootError
from netboot.image.kernel import Kernel


@dataclass(frozen=True)
class System:
    toplevel: Path  # the real path, e.g. /nix/store/…-nixos-system-host-24.11
    kernel: Path
    init: Path  # as the kernel will see it: <toplevel>/init
    params: str
    modules: Path | None  # <toplevel>/kernel-modules, when present
    kernel_version: str | None
    kernel_image: Kernel  # the kernel recognised: its architecture, and how to copy it

    @property
    def arch(self) -> str:
        return self.kernel_image.arch

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
            raise NetbootError(
                f"system {given} is not a system: it has no kernel (expected a bzImage or an arm64 Image at "
                f"{kernel}, as a NixOS toplevel has beside init and kernel-params: build one with `nixos-rebuild "
                "build` or `nix-build '<nixpkgs/nixos>' -A config.system.build.toplevel`); for another root "
                "filesystem give --rootfs DIR or --oci IMAGE.tar, with --kernel")
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
        image = Kernel.load(kernel)
        return cls(
            toplevel=toplevel,
            kernel=kernel,
            init=init,
            params=params,
            modules=modules if modules.is_dir() else None,
            kernel_version=image.version,
            kernel_image=image,
        )

