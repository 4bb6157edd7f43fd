"""Store trees made by hand, with a closure-info directory, for inputs Nix would never produce."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path


def store_path(store: Path, name: str) -> Path:
    """A path named like a Nix store path (32 base32 characters, a dash, a name)."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    hash32 = "".join(alphabet[int(c, 16) % 32] for c in digest[:32])
    return store / f"{hash32}-{name}"


def make_system(store: Path, *, kernel: bytes = b"not really a kernel", init: bool = True) -> Path:
    top = store_path(store, "fake-system")
    top.mkdir(parents=True)
    (top / "kernel").write_bytes(kernel)
    if init:
        (top / "init").write_text("#!/bin/sh\n")
        (top / "init").chmod(0o555)
    (top / "kernel-params").write_text("console=ttyS0\n")
    return top


def closure_info(where: Path, paths: list[Path], registration: bytes | None = None) -> Path:
    info = Path(tempfile.mkdtemp(prefix="closure-info-", dir=where))
    (info / "store-paths").write_text("".join(f"{p}\n" for p in paths))
    if registration is None:
        registration = "".join(f"{p}\n\n0\n" for p in paths).encode()
    (info / "registration").write_bytes(registration)
    return info
