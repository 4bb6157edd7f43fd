"""DHCP datagrams as firmware sends them, built byte by byte, and replies read back the same way.

Independent of netboot's codec on purpose: what the server must accept and send is written here from the
RFCs (RFC 2131 §2, RFC 2132) and from what EDK2 and iPXE were seen to send (see the reference notes).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

COOKIE = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

EDK2_VENDOR = b"PXEClient:Arch:00007:UNDI:003000"
IPXE_UEFI_VENDOR = b"PXEClient:Arch:00007:UNDI:003010"
BIOS_VENDOR = b"PXEClient:Arch:00000:UNDI:002001"
HTTP_VENDOR = b"HTTPClient:Arch:00016:UNDI:003000"
UUID = bytes([0]) + bytes(range(1, 17))


def ip(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def request(kind: int, mac: str = "52:54:00:00:00:01", *, options: list[tuple[int, bytes]] = (),
            ciaddr: str = "0.0.0.0", giaddr: str = "0.0.0.0", xid: int = 0x1234ABCD, flags: int = 0x8000,
            htype: int = 1, hlen: int = 6, end: bool = True) -> bytes:
    chaddr = bytes.fromhex(mac.replace(":", "")).ljust(16, b"\0")
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, htype, hlen, 0, xid, 3, flags, ip(ciaddr), ip("0.0.0.0"),
                        ip("0.0.0.0"), ip(giaddr), chaddr, b"", b"")
    body = bytes([53, 1, kind])
    for code, value in options:
        body += bytes([code, len(value)]) + value
    return fixed + COOKIE + body + (b"\xff" if end else b"")


def edk2(kind: int = DISCOVER, mac: str = "52:54:00:00:00:01", **kw) -> bytes:
    """EDK2's own PXE client (OVMF): arch 7, UNDI 3.0, a GUID, the options it asks for."""
    extra = kw.pop("extra", [])
    return request(kind, mac, options=[
        (57, struct.pack("!H", 1472)), (93, b"\x00\x07"), (94, b"\x01\x03\x00"), (97, UUID),
        (55, bytes([1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58, 59, 60, 66,
                    67, 97, 128, 129, 130, 131, 132, 133, 134, 135])),
        (60, EDK2_VENDOR), *extra], **kw)


def ipxe(kind: int = DISCOVER, mac: str = "52:54:00:00:00:01", arch: int = 7, **kw) -> bytes:
    """iPXE: PXEClient too, but user class iPXE and its feature option 175."""
    extra = kw.pop("extra", [])
    vendor = IPXE_UEFI_VENDOR if arch else b"PXEClient:Arch:00000:UNDI:002001"
    return request(kind, mac, options=[
        (57, struct.pack("!H", 1472)), (93, struct.pack("!H", arch)), (94, b"\x01\x02\x01"),
        (60, vendor), (77, b"iPXE"), (55, bytes([1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 175, 203])),
        (175, b"\xb1\x05\x01\x80\x86\x10\x0e\xeb\x03\x01\x00\x00"), *extra], **kw)


def bios(kind: int = DISCOVER, mac: str = "52:54:00:00:00:01", extra=(), **kw) -> bytes:
    return request(kind, mac, options=[(93, b"\x00\x00"), (94, b"\x01\x02\x01"), (97, UUID), (60, BIOS_VENDOR),
                                       (55, bytes([1, 3, 43, 60, 66, 67])), *extra], **kw)


def http_boot(kind: int = DISCOVER, mac: str = "52:54:00:00:00:01", extra=(), **kw) -> bytes:
    return request(kind, mac, options=[(93, b"\x00\x10"), (60, HTTP_VENDOR), (55, bytes([1, 3, 43, 60, 66, 67])),
                                       *extra], **kw)


def plain(kind: int = DISCOVER, mac: str = "52:54:00:00:00:01", extra=(), **kw) -> bytes:
    """An ordinary DHCP client (a laptop, a phone): nothing of network booting."""
    return request(kind, mac, options=[(55, bytes([1, 3, 6, 15])), (12, b"laptop"), *extra], **kw)


@dataclass
class Reply:
    op: int
    xid: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    mac: str
    sname: str
    file: str
    options: dict[int, bytes] = field(default_factory=dict)
    size: int = 0

    @property
    def type(self) -> int:
        return self.options[53][0]

    def text(self, code: int) -> str | None:
        return self.options[code].decode() if code in self.options else None

    def address(self, code: int) -> str | None:
        return str(ipaddress.IPv4Address(self.options[code])) if code in self.options else None

    def number(self, code: int) -> int | None:
        return int.from_bytes(self.options[code], "big") if code in self.options else None


def parse_reply(data: bytes) -> Reply:
    op, _, _, _, xid, _, flags, ci, yi, si, gi, chaddr, sname, file = struct.unpack_from(
        "!BBBBIHH4s4s4s4s16s64s128s", data)
    assert data[236:240] == COOKIE, "no magic cookie"
    options: dict[int, bytes] = {}
    at = 240
    while data[at] != 255:
        if data[at] == 0:
            at += 1
            continue
        code, length = data[at], data[at + 1]
        assert code not in options, f"option {code} twice"
        options[code] = data[at + 2 : at + 2 + length]
        assert len(options[code]) == length, f"option {code} overflows"
        at += 2 + length
    addr = [str(ipaddress.IPv4Address(x)) for x in (ci, yi, si, gi)]
    return Reply(op, xid, flags, *addr, chaddr[:6].hex(":"), sname.rstrip(b"\0").decode(),
                 file.rstrip(b"\0").decode(), options, len(data))
