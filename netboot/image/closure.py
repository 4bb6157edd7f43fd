"""The store closure of a system: every store path it needs, and Nix's registration data for them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from netboot.core.errors import NetbootError
from netboot.core.run import require, run

# A store path's name: 32 characters of Nix's base32 (no e, o, u, t), a dash, a name.
_STORE_NAME = re.compile(r"[0-9a-df-np-sv-z]{32}-[^/]+")

REGISTRATION_NAME = "nix-path-registration"


def is_store_path(path: Path) -> bool:
    return bool(_STORE_NAME.fullmatch(path.name))


@dataclass(frozen=True)
class Closure:
    store_dir: Path  # e.g. /nix/store
    paths: tuple[Path, ...]  # sorted by name
    registration: bytes  # `nix-store --load-db` input

    @classmethod
    def of(cls, toplevel: Path, closure_info: Path | None) -> Closure:
        if closure_info is not None:
            return cls._from_closure_info(toplevel, closure_info)
        if not is_store_path(toplevel):
            raise NetbootError(
                f"system {toplevel} is not a Nix store path, so its closure is unknown; pass --closure-info DIR"
            )
        nix_store = require("nix-store", "install Nix, or pass --closure-info DIR")
        listed = run([nix_store, "--query", "--requisites", str(toplevel)], what="querying the closure").stdout
        paths = sorted(cls._parse_paths(listed, "nix-store --query --requisites"), key=lambda p: p.name)
        registration = run([nix_store, "--dump-db", *map(str, paths)], what="dumping the registration").stdout
        return cls._checked(toplevel, paths, registration, "nix-store --query --requisites")

    @classmethod
    def _from_closure_info(cls, toplevel: Path, info: Path) -> Closure:
        if not info.is_dir():
            raise NetbootError(f"--closure-info {info} is not a directory")
        try:
            listed = (info / "store-paths").read_bytes()
            registration = (info / "registration").read_bytes()
        except OSError as e:
            raise NetbootError(f"--closure-info {info}: cannot read {Path(e.filename).name}: {e.strerror}") from e
        paths = cls._parse_paths(listed, f"{info}/store-paths")
        return cls._checked(toplevel, paths, registration, f"{info}/store-paths")

    @staticmethod
    def _parse_paths(listed: bytes, source: str) -> list[Path]:
        paths = [Path(os.fsdecode(line)) for line in listed.split(b"\n") if line.strip()]
        for p in paths:
            if not p.is_absolute() or not is_store_path(p):
                raise NetbootError(f"{source} lists {p}, which is not a store path")
        return paths

    @classmethod
    def _checked(cls, toplevel: Path, paths: list[Path], registration: bytes, source: str) -> Closure:
        if toplevel not in paths:
            raise NetbootError(f"{source} does not contain the system {toplevel}")
        store_dir = toplevel.parent
        for p in paths:
            if p.parent != store_dir:
                raise NetbootError(f"{source} lists {p}, outside the system's store {store_dir}")
            if not os.path.lexists(p):
                raise NetbootError(f"store path {p} is missing")
        return cls(store_dir, tuple(sorted(set(paths), key=lambda p: p.name)), registration)
