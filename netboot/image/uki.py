"""`netboot build --uki`: a unified kernel image, `netboot.efi`.

systemd's UEFI stub (`linuxx64.efi.stub`, Debian's systemd-boot-efi) with the os-release, the command line, the
kernel and the initrd added as PE sections by objcopy, as systemd-stub(7) of systemd 252 assembles one (Debian 12
has no ukify). Signed as a whole, it has shim verify all four at once; without Secure Boot it boots as well.

Section addresses are systemd-stub(7)'s example values, each moved up past the end of the section before it
where that one is larger than the gap (the page says they are examples, and that sections must not overlap).
"""

from __future__ import annotations

import os
from pathlib import Path

from netboot.core import loaders
from netboot.core.errors import NetbootError
from netboot.core.run import require, run

STUB_DIR = Path("/usr/lib/systemd/boot/efi")  # Debian's systemd-boot-efi
# (section, systemd-stub(7)'s address for it), in the order they are laid out.
SECTIONS = ((".osrel", 0x20000), (".cmdline", 0x30000), (".linux", 0x2000000), (".initrd", 0x3000000))
_ALIGN = 0x1000
_MAX_IMAGE = 0xFFFFFFFF  # a PE image's size is a 32-bit field


def stub(arch: str = loaders.DEFAULT_ARCH) -> Path:
    """The stub of an architecture: linux<efi>.efi.stub (linuxx64.efi.stub, linuxaa64.efi.stub)."""
    return STUB_DIR / f"linux{loaders.arch(arch).efi}.efi.stub"


def check(arch: str = loaders.DEFAULT_ARCH) -> None:
    """What --uki needs, before anything is built."""
    require("objcopy", "install Debian's binutils: --uki needs it")
    if not stub(arch).is_file():
        raise NetbootError(f"{stub(arch)} is missing: --uki needs systemd's UEFI stub (install Debian's "
                           "systemd-boot-efi)")


def os_release(name: str, kernel_version: str | None, system_file: Path | None) -> bytes:
    """The .osrel section: the system's own os-release when it has one (a NixOS toplevel's etc/os-release),
    else one naming the system."""
    if system_file is not None and system_file.is_file():
        try:
            return system_file.read_bytes()
        except OSError as e:
            raise NetbootError(f"cannot read {system_file}: {e.strerror}") from e
    version = f'VERSION_ID="{kernel_version}"\n' if kernel_version else ""
    return f'NAME="netboot"\nID=netboot\nPRETTY_NAME="{name}"\n{version}'.encode()


def write(out: Path, kernel: Path, initrd: Path, cmdline: str, osrel: bytes, epoch: int,
          arch: str = loaders.DEFAULT_ARCH) -> None:
    """Assemble the unified kernel image `out` (unsigned) from its parts, reproducibly."""
    parts = {".osrel": out.with_name(f".{out.name}.osrel"), ".cmdline": out.with_name(f".{out.name}.cmdline")}
    try:
        parts[".osrel"].write_bytes(osrel)
        parts[".cmdline"].write_bytes(cmdline.encode())
        files = {**parts, ".linux": kernel, ".initrd": initrd}
        argv = ["objcopy"]
        end = 0
        for section, example in SECTIONS:
            address = max(example, _aligned(end))
            end = address + files[section].stat().st_size
            argv += ["--add-section", f"{section}={files[section]}", "--change-section-vma", f"{section}={address:#x}"]
        if end > _MAX_IMAGE:
            raise NetbootError(f"the unified kernel image would be {end / 2**30:.1f} GiB: a PE image cannot exceed "
                               "4 GiB (a smaller initrd, or no --uki)")
        run([*argv, str(stub(arch)), str(out)], what="assembling the unified kernel image")
    finally:
        for f in parts.values():
            f.unlink(missing_ok=True)
    pin_timestamp(out, epoch)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def pin_timestamp(path: Path, epoch: int) -> None:
    """Set the PE header's TimeDateStamp to `epoch` and its CheckSum to match: objcopy (binutils 2.40) stamps the
    time it ran and has no option to pin it."""
    with open(path, "r+b") as f:
        f.seek(0x3C)
        pe = int.from_bytes(f.read(4), "little")
        f.seek(pe + 8)  # "PE\0\0", then the COFF header: Machine, NumberOfSections, TimeDateStamp
        f.write((epoch & 0xFFFFFFFF).to_bytes(4, "little"))
        at = pe + 24 + 64  # the optional header's CheckSum, in PE32 and PE32+ alike
        f.seek(at)
        f.write(bytes(4))
        f.flush()
        f.seek(at)
        f.write(pe_checksum(f.fileno()).to_bytes(4, "little"))


def pe_checksum(fd: int) -> int:
    """The PE CheckSum of a file whose CheckSum field is zero: the 16-bit words summed with end-around carry,
    plus the file's length (as Windows' CheckSumMappedFile and sbsigntool compute it). An end-around-carry sum
    is the sum modulo 0xFFFF, and a little-endian integer is congruent modulo 0xFFFF to the sum of its 16-bit
    words (0x10000 = 1 mod 0xFFFF), so a chunk at a time is one big-integer remainder, done in C."""
    size = os.fstat(fd).st_size
    total = 0
    nonzero = False
    offset = 0
    while offset < size:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        offset += len(chunk)
        if len(chunk) % 2:
            chunk += b"\0"
        value = int.from_bytes(chunk, "little")
        nonzero = nonzero or value != 0
        total = (total + value % 0xFFFF) % 0xFFFF
    if total == 0 and nonzero:
        total = 0xFFFF  # a non-zero sum that folds to a multiple of 0xFFFF ends as 0xFFFF, not 0
    return (total + size) & 0xFFFFFFFF
