"""Compressors for initrd members, squashfs and erofs images, and the kernel's constraints on each.

Streams are compressed by the standard command-line tools in a pipe (they are faster than anything
in-process and are what the kernel's own scripts use); each choice below keeps the output bootable and
bit-for-bit reproducible (Documentation/driver-api/early-userspace/buffer-format.rst, lib/decompress_*.c).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from netboot.core.errors import NetbootError


def _threads(minimum: int = 1) -> str:
    return str(max(minimum, os.cpu_count() or 1))


@dataclass(frozen=True)
class Compressor:
    name: str
    levels: tuple[int, int] | None  # inclusive range, None when levels mean nothing
    default_level: int | None

    def check_level(self, level: int | None) -> int | None:
        if level is None:
            return self.default_level
        if self.levels is None:
            raise NetbootError(f"--level does not apply to --compress {self.name}")
        low, high = self.levels
        if not low <= level <= high:
            raise NetbootError(f"--level {level} is out of range for {self.name} ({low}-{high})")
        return level

    def stream_argv(self, level: int | None) -> list[str] | None:
        """Command that compresses stdin to stdout as one member the kernel accepts; None = store as is."""
        match self.name:
            case "zstd":
                # Multithreaded zstd output is identical for any thread count >= 1 (but differs from
                # --single-thread), so -T<cores> stays reproducible across machines.
                return ["zstd", "-q", "-c", f"-{level}", f"-T{_threads()}"]
            case "xz":
                # The kernel's xz decoder supports only CRC32 (or no) checks, and wants a dictionary of at
                # most 1 MiB. xz's multithreaded output is identical for any thread count >= 2, but differs
                # from -T1, so at least two threads keep it reproducible on a one-core machine too.
                return ["xz", "-q", "-c", "--check=crc32", f"--lzma2=preset={level},dict=1MiB",
                        "--block-size=8MiB", f"-T{_threads(2)}"]
            case "gzip":
                return ["gzip", "-q", "-c", "-n", f"-{level}"]
            case "lz4":
                # The kernel reads only the legacy lz4 frame.
                return ["lz4", "-q", "-c", "-l", f"-{level}"]
            case _:
                return None

    def squashfs_args(self, level: int | None, explicit_level: bool) -> list[str]:
        """mksquashfs options for this compressor (squashfs-tools 4.5)."""
        match self.name:
            case "zstd" | "gzip":
                return ["-comp", self.name, "-Xcompression-level", str(level)]
            case "xz":
                if explicit_level:
                    raise NetbootError("mksquashfs's xz compressor has no levels; drop --level for squashfs xz")
                return ["-comp", "xz"]
            case "lz4":
                # lz4 levels 3 and above are its high-compression mode, the one switch mksquashfs offers.
                return ["-comp", "lz4", *(["-Xhc"] if level is not None and level >= 3 else [])]
            case _:
                return ["-noI", "-noD", "-noF", "-noX"]


    def compresses_erofs(self) -> bool:
        """Whether erofs compresses with this one itself. The kernel's erofs reads lz4 (lzma too, where it was
        built with it; Debian's is not). With another compressor the image is left uncompressed, and the
        initrd member holding it is compressed: the kernel unpacks it once, into memory, at boot."""
        return self.name == "lz4"

    def erofs_args(self, level: int | None) -> list[str]:
        """mkfs.erofs options for this compressor (erofs-utils 1.5)."""
        if not self.compresses_erofs():
            return []
        # lz4 levels 3 and above are its high-compression mode, lz4hc.
        return ["-zlz4"] if level is None or level < 3 else [f"-zlz4hc,{level}"]


COMPRESSORS: dict[str, Compressor] = {
    c.name: c
    for c in (
        # zstd 20-22 needs --ultra and windows the kernel's initramfs decoder may not accept.
        Compressor("zstd", (1, 19), 10),
        Compressor("xz", (0, 9), 6),
        Compressor("gzip", (1, 9), 6),
        Compressor("lz4", (1, 12), 9),
        Compressor("none", None, None),
    )
}


def get(name: str) -> Compressor:
    try:
        return COMPRESSORS[name]
    except KeyError:
        raise NetbootError(f"unknown compression {name!r} (choose from {', '.join(COMPRESSORS)})") from None
