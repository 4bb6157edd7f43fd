"""ELF headers: which architecture a program is built for, and whether it needs a dynamic loader.

From the System V gABI (man 5 elf): the identification bytes, e_type and e_machine, and the program headers,
where a PT_INTERP entry names the loader a dynamically linked program needs. Reading three fields does not
warrant a library (pyelftools would be a dependency for these few lines).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

# e_machine values (elf.h) by the names netboot gives architectures (core/artifacts.ARCHES), and a few more
# that a wrong file may be built for.
MACHINES = {62: "x86_64", 183: "arm64", 3: "i386", 40: "arm32", 243: "riscv", 258: "loongarch",
            8: "mips", 20: "powerpc", 21: "powerpc64", 22: "s390"}
_PT_INTERP = 3


@dataclass(frozen=True)
class ElfHeader:
    arch: str  # by MACHINES, else "machine N"
    bits: int  # 32 or 64
    dynamic: bool  # a PT_INTERP program header: the program needs a dynamic loader

    @property
    def what(self) -> str:
        """How a message names it: "a static arm64 ELF program", "a dynamically linked x86_64 ELF program"."""
        return f"a {'dynamically linked' if self.dynamic else 'static'} {self.arch} ELF program"


def read_header(path: Path) -> ElfHeader | None:
    """The header of the ELF file at `path`; None when it is not one (or is cut short). OSError: unreadable."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None
        order = "<" if ident[5] == 1 else ">"
        bits = 64 if ident[4] == 2 else 32
        machine, = struct.unpack_from(order + "H", ident, 18)
        if bits == 64:
            if len(ident) < 64:
                return None
            phoff, = struct.unpack_from(order + "Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x36)
        else:
            phoff, = struct.unpack_from(order + "I", ident, 0x1C)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x2A)
        if phnum and phentsize < 4:
            return None
        f.seek(phoff)
        table = f.read(phentsize * phnum)  # a kernel module (a relocatable object) has none
    if len(table) < phentsize * phnum:
        return None
    dynamic = any(struct.unpack_from(order + "I", table, i * phentsize)[0] == _PT_INTERP for i in range(phnum))
    return ElfHeader(MACHINES.get(machine, f"machine {machine}"), bits, dynamic)
