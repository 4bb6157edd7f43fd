"""Store trees made by hand, with a closure-info directory, for inputs Nix would never produce."""

from __future__ import annotations

import gzip
import hashlib
import struct
import tempfile
from pathlib import Path


def bzimage(release: str = "6.1.0-fake") -> bytes:
    """The start of an x86 bzImage: "HdrS" at 0x202, and the kernel_version pointer at 0x20E to its release
    (Documentation/arch/x86/boot.rst)."""
    head = bytearray(0x400)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = struct.pack("<H", 0x300 - 0x200)
    text = f"{release} (fake@example) #1".encode()
    head[0x300:0x300 + len(text)] = text
    return bytes(head)


def arm64_image(release: str | None = "6.1.0-fake-arm64", *, flags: int = 0b1010, gzipped: bool = False) -> bytes:
    """An arm64 Image's header (Documentation/arch/arm64/booting.rst: magic "ARM\x64" at 0x38, flags at 0x18)
    and, further on, the banner that names its release."""
    head = bytearray(0x1000)
    head[:2] = b"MZ"
    head[0x18:0x20] = struct.pack("<Q", flags)
    head[0x38:0x3C] = b"ARM\x64"
    if release is not None:
        banner = f"Linux version {release} (fake@example) (gcc) #1 SMP\n".encode()
        head[0x800:0x800 + len(banner)] = banner
    return gzip.compress(bytes(head), mtime=0) if gzipped else bytes(head)


def store_path(store: Path, name: str) -> Path:
    """A path named like a Nix store path (32 base32 characters, a dash, a name)."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    hash32 = "".join(alphabet[int(c, 16) % 32] for c in digest[:32])
    return store / f"{hash32}-{name}"


def make_system(store: Path, *, kernel: bytes | None = None, init: bool = True) -> Path:
    top = store_path(store, "fake-system")
    top.mkdir(parents=True)
    (top / "kernel").write_bytes(bzimage() if kernel is None else kernel)
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
