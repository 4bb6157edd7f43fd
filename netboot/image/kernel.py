"""The kernel a build boots: which architecture it is for, its release, and its file as the loaders want it.

Recognised by their boot headers:
- x86: a bzImage, "HdrS" at 0x202 (Documentation/arch/x86/boot.rst); its release is in the setup header.
- arm64: an Image, the magic "ARM\\x64" at 0x38 (Documentation/arch/arm64/booting.rst). Distributions ship it
  uncompressed with an EFI stub (Debian's /boot/vmlinuz-*, NixOS's `kernel`), or gzip-compressed (Image.gz,
  Ubuntu's arm64 /boot/vmlinuz-*). A compressed one is unpacked into the build's `Image`: UEFI firmware, GRUB and
  iPXE on arm64 load the kernel as a PE program through its EFI stub, and only QEMU's -kernel would unpack it.
  The arm64 header holds no release; the kernel's banner ("Linux version <release> (…") does.
Anything else (an arm32 zImage, a RISC-V Image, an EFI zboot image, another PE or ELF file) is named in the
error, so that a wrong file is told apart from a damaged one.
"""

from __future__ import annotations

import contextlib
import gzip
import mmap
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from netboot.core.errors import NetbootError
from netboot.image.elf import read_header

_ARM64_MAGIC = b"ARM\x64"
_GZIP_MAGIC = b"\x1f\x8b"
_BANNER = re.compile(rb"Linux version (\d+\.\d+[^\s\0]*) \(")
# Far above any real kernel (a distribution's arm64 Image is 30-40 MB): what unpacking a given Image.gz may write.
MAX_IMAGE = 512 << 20
_SUPPORTED = "netboot boots an x86_64 bzImage or an arm64 Image (or Image.gz)"
# PE machine types (the PE format's "Machine Types"), for naming a PE file that is not a kernel netboot boots.
_PE_MACHINES = {0x8664: "x86_64", 0xAA64: "arm64", 0x14C: "i386", 0x1C2: "arm32", 0x1C4: "arm32",
                0x5032: "riscv32", 0x5064: "riscv64", 0x6264: "loongarch64"}


@dataclass(frozen=True)
class Kernel:
    path: Path
    arch: str  # core/artifacts.ARCHES
    version: str | None  # the release (`uname -r`), when the file says
    gzipped: bool = False  # an Image.gz, unpacked by copy_to

    @classmethod
    def load(cls, path: Path) -> Kernel:
        """The kernel at `path`, recognised; NetbootError naming what it is when netboot cannot boot it."""
        try:
            with open(path, "rb") as f:
                head = f.read(0x8000)
        except IsADirectoryError:
            raise NetbootError(f"kernel {path} is not a file") from None
        except FileNotFoundError:
            raise NetbootError(f"kernel {path} does not exist") from None
        except OSError as e:
            raise NetbootError(f"cannot read kernel {path}: {e.strerror}") from e
        if head[0x202:0x206] == b"HdrS":
            return cls(path, "x86_64", _bzimage_release(head))
        if head[0x38:0x3C] == _ARM64_MAGIC:
            _check_arm64(path, head)
            return cls(path, "arm64", _banner_release(path, gzipped=False))
        if head[:2] == _GZIP_MAGIC:
            inner = _gunzip_head(path)
            if inner[0x38:0x3C] == _ARM64_MAGIC:
                _check_arm64(path, inner)
                return cls(path, "arm64", _banner_release(path, gzipped=True), gzipped=True)
            raise NetbootError(f"kernel {path} is gzip-compressed but not an arm64 Image; {_SUPPORTED}")
        raise NetbootError(f"kernel {path} is {_describe(path, head)}; {_SUPPORTED}")

    def copy_to(self, dest: Path) -> None:
        """Write the kernel as the loaders want it, an Image.gz unpacked."""
        if not self.gzipped:
            shutil.copyfile(self.path, dest)
            return
        try:
            with gzip.open(self.path, "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    if out.tell() + len(chunk) > MAX_IMAGE:
                        raise NetbootError(f"kernel {self.path} unpacks to more than {MAX_IMAGE >> 20} MiB")
                    out.write(chunk)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a write error is the disk's: OSError goes on
            raise NetbootError(f"kernel {self.path}: its gzip stream is damaged ({e})") from None


def _check_arm64(path: Path, head: bytes) -> None:
    flags, = struct.unpack_from("<Q", head, 0x18)
    if flags & 1:  # booting.rst: bit 0 of flags, the kernel's endianness
        raise NetbootError(f"kernel {path} is a big-endian arm64 Image; {_SUPPORTED}")


def _bzimage_release(head: bytes) -> str | None:
    """boot.rst: the 16-bit kernel_version field at 0x20E points to a NUL-terminated string, 0x200 bytes before
    where it says."""
    pointer = int.from_bytes(head[0x20E:0x210], "little")
    if pointer == 0:
        return None
    start = pointer + 0x200
    end = head.find(b"\0", start)
    text = head[start:end] if end >= 0 else b""
    return text.split(b" ", 1)[0].decode(errors="replace") or None


def _banner_release(path: Path, *, gzipped: bool) -> str | None:
    """The release in the kernel's banner (init/version.c: "Linux version " UTS_RELEASE " (" …)."""
    if not gzipped:
        with open(path, "rb") as f, contextlib.suppress(ValueError), mmap.mmap(
                f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            found = _BANNER.search(m)
            return found.group(1).decode(errors="replace") if found else None
        return None
    tail = b""
    seen = 0
    try:
        with gzip.open(path, "rb") as f:
            while seen < MAX_IMAGE and (chunk := f.read(1 << 20)):
                seen += len(chunk)
                found = _BANNER.search(tail + chunk)
                if found:
                    return found.group(1).decode(errors="replace")
                tail = chunk[-256:]
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise NetbootError(f"kernel {path}: its gzip stream is damaged ({e})") from None
    return None


def _gunzip_head(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(0x40)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise NetbootError(f"kernel {path}: its gzip stream is damaged ({e})") from None


def _describe(path: Path, head: bytes) -> str:
    """What a file that is not a kernel netboot boots is, in a few words."""
    if len(head) >= 0x28 and struct.unpack_from("<I", head, 0x24)[0] == 0x016F2818:
        return "an arm32 zImage"  # Documentation/arch/arm/booting.rst: the zImage magic at 0x24
    if head[0x38:0x3C] == b"RSC\x05" or head[0x30:0x38] == b"RISCV\0\0\0":
        return "a RISC-V Image"  # Documentation/arch/riscv/boot-image-header.rst
    if head[:2] == b"MZ":
        if head[4:8] == b"zimg":  # drivers/firmware/efi/libstub/zboot-header.S
            return ("an EFI zboot image (a compressed kernel inside an EFI decompressor, CONFIG_EFI_ZBOOT); give "
                    "the Image inside it")
        (pe_offset,) = struct.unpack_from("<I", head, 0x3C) if len(head) >= 0x40 else (0,)
        if head[pe_offset:pe_offset + 4] == b"PE\0\0" and len(head) >= pe_offset + 6:
            machine, = struct.unpack_from("<H", head, pe_offset + 4)
            return f"a PE file for {_PE_MACHINES.get(machine, f'machine {machine:#x}')} without a Linux boot header"
        return "an MS-DOS/PE file without a Linux boot header"
    with contextlib.suppress(OSError):
        elf = read_header(path)
        if elf is not None:
            return f"an ELF file for {elf.arch} (a vmlinux?), not a boot image"
    return "not a Linux kernel image (no boot header)"
