"""Which kind of network-boot client sent a request, and which boot file it gets.

    BIOS PXE ROM              (PXEClient, arch 0)     undionly.kpxe over TFTP
    UEFI x64 PXE              (PXEClient, arch 7, 9)  ipxe.efi (or snponly.efi) over TFTP
    iPXE, any firmware        (user class iPXE, 175)  http://server:port/boot.ipxe: no chainload loop
    UEFI x64 HTTP Boot        (HTTPClient, arch 16)   http://server:port/ipxe.efi, answered with HTTPClient

A machine whose profile boots through shim and GRUB (loader = "grub" or "uki": Secure Boot) gets, as a UEFI
client, its architecture's shim instead (loaders.py): shimx64.efi over TFTP (PXE, arch 7, 9), or
http://server:port/shimx64.efi (HTTP Boot, arch 16). BIOS ROMs and iPXE keep the iPXE path: neither runs under
Secure Boot.

    UEFI arm64 PXE            (PXEClient, arch 11)    arm64/ipxe.efi (--loaders arm64=DIR with ipxe.efi), else
    UEFI arm64 HTTP Boot      (HTTPClient, arch 19)   shimaa64.efi, which chains grubaa64.efi (any loader)

Architecture numbers are RFC 4578's as IANA keeps them; Debian's ipxe package has binaries for x86 only, and
Debian has no arm64 iPXE at all: GRUB is the arm64 loader that exists packaged.
A machine or its profile may choose its binary (`ipxe_binary` in the machines file): it gets it where it fits its
firmware (a .kpxe for BIOS, an .efi for UEFI), and the server's default elsewhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from netboot.core import loaders
from netboot.dhcp.message import Malformed, Request

PXE, HTTP, IPXE = "PXEClient", "HTTPClient", "iPXE"
BIOS_ARCH = 0
UEFI_X64_PXE = (7, 9)  # EDK2 sends 7; 9 is the same machine under the name EFI BC
UEFI_X64_HTTP = 16
_ARCH_NAMES = {0: "bios", 6: "uefi-ia32", 7: "uefi-x64", 9: "uefi-x64", 10: "uefi-arm32", 11: "uefi-arm64",
               15: "uefi-ia32", 16: "uefi-x64", 19: "uefi-arm64"}


@dataclass(frozen=True)
class Client:
    firmware: str  # PXE, HTTP, IPXE, or "" for a client that is not booting from the network
    arch: int | None

    @property
    def machine(self) -> str | None:
        """The architecture of the machine (core/artifacts.ARCHES), or None when its option 93 does not say one
        netboot builds for: BIOS (0) is an x86 PC; UEFI's by loaders.ARCHES."""
        if self.arch == BIOS_ARCH:
            return "x86_64"
        uefi = loaders.for_client(self.arch)
        return uefi[0].name if uefi is not None else None

    @property
    def kind(self) -> str:
        """For log lines: bios-pxe, uefi-x64-pxe, uefi-x64-http, ipxe-bios, ipxe-uefi-x64, dhcp, …"""
        if not self.firmware:
            return "dhcp"
        arch = _ARCH_NAMES.get(self.arch, f"arch{self.arch}") if self.arch is not None else "unknown-arch"
        if self.firmware == IPXE:
            return f"ipxe-{arch}"
        return f"{arch}-{'http' if self.firmware == HTTP else 'pxe'}"


def classify(request: Request) -> Client:
    """What sent `request`; raises Malformed for a vendor class (option 60) whose architecture is not a number."""
    arch = request.arches[0] if request.arches else _arch_of(request.vendor_class)
    # iPXE also says PXEClient in option 60; its user class (or its feature option 175) tells it apart.
    if b"iPXE" in request.user_class or request.ipxe_features:
        return Client(IPXE, arch)
    if request.vendor_class.startswith(HTTP):
        return Client(HTTP, arch)
    if request.vendor_class.startswith(PXE):
        return Client(PXE, arch)
    return Client("", arch)


def _arch_of(vendor_class: str) -> int | None:
    """PXEClient:Arch:00007:UNDI:003000 (or HTTPClient:…) → 7, for clients that leave out option 93; raises
    Malformed for an Arch field that is not a number of at most 5 ASCII digits."""
    parts = vendor_class.split(":", 3)
    if len(parts) < 3 or parts[0] not in (PXE, HTTP) or parts[1] != "Arch":
        return None
    field = parts[2]
    # PXE 2.1's class identifier "PXEClient:Arch:xxxxx:UNDI:yyyzzz" (UEFI 2.5's HTTPClient alike): five decimal
    # digits. str.isdigit() alone also takes "²" and other Unicode digits, which int() refuses: ASCII digits only.
    if not (field.isascii() and field.isdigit() and len(field) <= 5):
        raise Malformed(f"option 60 {vendor_class[:40]!r}: its Arch field is not a number")
    return int(field)


@dataclass(frozen=True)
class BootFile:
    name: str  # the file field: a TFTP name, or a URL
    server: str  # siaddr / next-server
    vendor_class: str  # what the answer says in option 60 (HTTPClient must be answered as such)

    @property
    def over_tftp(self) -> bool:
        return "://" not in self.name


@dataclass(frozen=True)
class Offerings:
    """What this server can hand out: the iPXE binaries it serves and where its TFTP and HTTP listen."""

    binaries: frozenset[str]
    http_port: int
    tftp: bool  # a TFTP server on port 69, which PXE ROMs need (their boot file name cannot carry a port)
    uefi_binary: str = "ipxe.efi"
    http_host: str | None = None  # where HTTP and TFTP listen, when on one address rather than on all
    tftp_host: str | None = None
    arches: Mapping[str, str] = field(default_factory=dict)  # profile name -> its build's architecture

    def boot_file(self, client: Client, server: str, loader: str = "ipxe", binary: str = "") -> BootFile | str:
        """The boot file for `client` from `server` (our address as the client sees it), or why there is none;
        `loader`: the machine's profile's (loaders.LOADERS); `binary`: the iPXE binary its machine chose, if any."""
        http = f"http://{self.http_host or server}:{self.http_port}"
        uefi_binary = binary if binary.endswith(".efi") else self.uefi_binary
        if client.firmware == IPXE:
            return BootFile(f"{http}/boot.ipxe", server, PXE)
        uefi = loaders.for_client(client.arch)
        if uefi is not None and (loader in loaders.SIGNED_CHAINS or (uefi[0].ipxe is not None and (
                uefi[0].ipxe not in self.binaries))):
            # Shim and GRUB: asked for, or the only loader there is for this architecture (no iPXE given).
            return self._shim(client, server, http, *uefi)
        if uefi is not None and uefi[0].ipxe is not None:  # the operator's iPXE for it
            if client.firmware == HTTP:
                return BootFile(f"{http}/{uefi[0].ipxe}", server, HTTP)
            if not self.tftp:
                return "PXE ROMs need TFTP on port 69, which this server does not serve"
            return BootFile(uefi[0].ipxe, self.tftp_host or server, PXE)
        if client.firmware == HTTP:
            if client.arch != UEFI_X64_HTTP:
                return f"no HTTP boot binary for architecture {client.arch}"
            if uefi_binary not in self.binaries:
                return f"{uefi_binary} is not installed (Debian's ipxe package)"
            return BootFile(f"{http}/{uefi_binary}", server, HTTP)
        if client.firmware == PXE:
            if client.arch == BIOS_ARCH:
                binary = binary if binary.endswith(".kpxe") else "undionly.kpxe"
            elif client.arch in UEFI_X64_PXE:
                binary = uefi_binary
            else:
                return f"no iPXE binary for architecture {client.arch}"
            if binary not in self.binaries:
                return f"{binary} is not installed (Debian's ipxe package)"
            if not self.tftp:
                return "PXE ROMs need TFTP on port 69, which this server does not serve"
            return BootFile(binary, self.tftp_host or server, PXE)
        return "not a network-boot client"

    def _shim(self, client: Client, server: str, http: str, arch: loaders.Arch, http_boot: bool) -> BootFile | str:
        """Shim, which fetches GRUB (and MokManager) from beside itself, over the same protocol."""
        if client.firmware not in (PXE, HTTP) or (client.firmware == HTTP) != http_boot:
            return "not a network-boot client"
        if arch.shim not in self.binaries:
            ipxe = " (or ipxe.efi in DIR)" if arch.ipxe is not None else ""
            return f"{arch.shim} is not served (Debian's shim-signed, or --loaders {arch.name}=DIR{ipxe})"
        if http_boot:
            return BootFile(f"{http}/{arch.shim}", server, HTTP)
        if not self.tftp:
            return "PXE ROMs need TFTP on port 69, which this server does not serve"
        return BootFile(arch.shim, self.tftp_host or server, PXE)


def client_uuids(option97: bytes | None) -> tuple[str, ...]:
    """The SMBIOS UUID in a client's option 97 (RFC 4578 §2.3: type 0, then 16 bytes), in iPXE's spelling.
    Firmware disagrees on the byte order of its first three fields (SMBIOS 2.6 stores them little-endian, PXE
    asks for network order, and both are sent), so both readings are given; one matches the machine's ${uuid}."""
    if option97 is None or len(option97) != 17 or option97[0] != 0:
        return ()
    raw = option97[1:]
    return str(uuid.UUID(bytes=raw)), str(uuid.UUID(bytes_le=raw))
