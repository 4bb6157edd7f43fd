"""DHCPv6 messages as firmware sends them, built byte by byte, and answers read back the same way.

Independent of netboot's codec on purpose: what the server must accept and send is written here from RFC 8415
(§8 message format, §9 relay format, §21 options), RFC 5970 (59, 61) and what EDK2 and iPXE send (their DUID-LLT,
IA_NA, option 6 asking for 59, option 61 arch 7, option 16 of enterprise 343, option 15 "iPXE").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv6Address

SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY, RELEASE, DECLINE = range(1, 10)
INFORMATION_REQUEST, RELAY_FORW, RELAY_REPL = 11, 12, 13
EDK2_VENDOR = b"PXEClient:Arch:00007:UNDI:003016"
HTTP_VENDOR = b"HTTPClient:Arch:00016:UNDI:003016"
XID = b"\x12\x34\x56"


def opt(code: int, value: bytes) -> bytes:
    return struct.pack("!HH", code, len(value)) + value


def duid_llt(mac: str, time: int = 0x2B0E_5F00) -> bytes:
    return struct.pack("!HHI", 1, 1, time) + bytes.fromhex(mac.replace(":", ""))


def duid_ll(mac: str) -> bytes:
    return struct.pack("!HH", 3, 1) + bytes.fromhex(mac.replace(":", ""))


def duid_uuid() -> bytes:
    return struct.pack("!H", 4) + bytes(range(16))


def ia_na(iaid: int = 1, *addresses: str) -> bytes:
    inner = b"".join(opt(5, IPv6Address(a).packed + struct.pack("!II", 0, 0)) for a in addresses)
    return opt(3, struct.pack("!III", iaid, 0, 0) + inner)


def vendor_class(data: bytes, enterprise: int = 343) -> bytes:
    return opt(16, struct.pack("!IH", enterprise, len(data)) + data)


def message(kind: int, *options: bytes, xid: bytes = XID) -> bytes:
    return bytes((kind,)) + xid + b"".join(options)


def edk2(kind: int = SOLICIT, mac: str = "52:54:00:00:00:01", *, iaid: int = 1, addresses: tuple[str, ...] = (),
         server: bytes | None = None, ia: bool = True, extra: tuple[bytes, ...] = ()) -> bytes:
    """EDK2's PXE over IPv6 (NetworkPkg/UefiPxeBcDxe/PxeBcDhcp6.c): DUID-LLT, IA_NA, ORO with 59 and 60, arch 7,
    vendor class of enterprise 343."""
    return message(kind, opt(1, duid_llt(mac)), *([opt(2, server)] if server else []),
                   *([ia_na(iaid, *addresses)] if ia else []), opt(6, struct.pack("!HHH", 59, 60, 23)),
                   opt(8, b"\x00\x00"), opt(61, struct.pack("!H", 7)), vendor_class(EDK2_VENDOR), *extra)


def ipxe(kind: int = SOLICIT, mac: str = "52:54:00:00:00:01", *, iaid: int = 1, addresses: tuple[str, ...] = (),
         server: bytes | None = None, ia: bool = True, rapid: bool = False, extra: tuple[bytes, ...] = ()) -> bytes:
    """iPXE (src/net/udp/dhcpv6.c): DUID-LL... as EDK2, with user class iPXE."""
    return message(kind, opt(1, duid_ll(mac)), *([opt(2, server)] if server else []),
                   *([ia_na(iaid, *addresses)] if ia else []), opt(6, struct.pack("!HHH", 23, 24, 59)),
                   opt(8, b"\x00\x00"), opt(61, struct.pack("!H", 7)), vendor_class(EDK2_VENDOR),
                   opt(15, struct.pack("!H", 4) + b"iPXE"), *([opt(14, b"")] if rapid else []), *extra)


def relay_forward(inner: bytes, peer: str = "fe80::5054:ff:fe00:1", link: str = "2001:db8::1",
                  hops: int = 0, *extra: bytes) -> bytes:
    return bytes((RELAY_FORW, hops)) + IPv6Address(link).packed + IPv6Address(peer).packed + b"".join(extra) + \
        opt(9, inner)


@dataclass
class Answer:
    type: int
    xid: bytes
    options: dict[int, list[bytes]] = field(default_factory=dict)

    def one(self, code: int) -> bytes:
        values = self.options.get(code, [])
        assert len(values) == 1, (code, values)
        return values[0]

    @property
    def addresses(self) -> list[tuple[int, str, int, int]]:
        """(IAID, address, preferred, valid) of every IA_NA's IAADDR."""
        found = []
        for ia in self.options.get(3, []):
            iaid = struct.unpack_from("!I", ia)[0]
            for code, value in walk(ia[12:]):
                if code == 5:
                    found.append((iaid, str(IPv6Address(value[:16])), *struct.unpack_from("!II", value, 16)))
        return found

    @property
    def ia_statuses(self) -> list[int]:
        return [struct.unpack_from("!H", v)[0] for ia in self.options.get(3, []) for c, v in walk(ia[12:])
                if c == 13]

    @property
    def status(self) -> int | None:
        values = self.options.get(13)
        return struct.unpack_from("!H", values[0])[0] if values else None


def walk(data: bytes) -> list[tuple[int, bytes]]:
    found, at = [], 0
    while at < len(data):
        code, length = struct.unpack_from("!HH", data, at)
        assert at + 4 + length <= len(data), "an option past the end"
        found.append((code, data[at + 4 : at + 4 + length]))
        at += 4 + length
    return found


def read(data: bytes) -> Answer:
    answer = Answer(data[0], data[1:4])
    for code, value in walk(data[4:]):
        answer.options.setdefault(code, []).append(value)
    return answer


def unwrap(data: bytes) -> tuple[list[tuple[int, str, str, dict[int, list[bytes]]]], Answer]:
    """A Relay-Reply's relays (hop count, link, peer, their options) outermost first, and the answer inside."""
    relays = []
    while data[0] == RELAY_REPL:
        options: dict[int, list[bytes]] = {}
        for code, value in walk(data[34:]):
            options.setdefault(code, []).append(value)
        relays.append((data[1], str(IPv6Address(data[2:18])), str(IPv6Address(data[18:34])), options))
        data = options[9][0]
    return relays, read(data)
