"""DHCP messages: a request parsed strictly, a reply built, both through pyroute2's DHCPv4 codec.

pyroute2's `dhcp4msg` does the fields and the options (RFC 2131 §2, RFC 2132). Two things it does not do
are added here: it stops at the first option it cannot decode and returns what it had (so a truncated or
overflowing option would pass as a shorter message), and it decodes text-like options lossily (trailing NULs
stripped, UTF-8 tried). So the options area is first walked once to check its structure, a message whose
options pyroute2 did not all decode is refused, and the options netboot reads as bytes (vendor, user class,
architecture, client identifiers, relay information) are decoded as byte arrays.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from pyroute2.dhcp.dhcp4msg import dhcp4msg
from pyroute2.dhcp.enums.dhcp import MessageType, Option

# pyroute2 logs each option it fails to decode and carries on; a refused datagram gets one line of ours instead.
logging.getLogger("pyroute2.dhcp").setLevel(logging.CRITICAL)

BOOTREQUEST, BOOTREPLY = 1, 2
HTYPE_ETHERNET = 1
COOKIE = b"\x63\x82\x53\x63"
FIXED = 236  # op … file (RFC 2131 §2)
OPTIONS_AT = FIXED + len(COOKIE)
MIN_REPLY = 300  # BOOTP's minimum message size: some PXE ROMs drop shorter replies (RFC 1542 §2.1)
MAX_DATAGRAM = 1500  # what one Ethernet frame carries; larger requests are not from real clients
ZERO = "0.0.0.0"

# Options netboot reads or echoes as raw bytes (pyroute2 would decode them as text).
_RAW = (
    Option.VENDOR_SPECIFIC_INFORMATION,  # 43
    Option.CLIENT_ID,  # 61
    Option.USER_CLASS_INFORMATION,  # 77
    Option.RELAY_AGENT_INFORMATION,  # 82
    Option.CLIENT_SYSTEM_ARCHITECTURE_TYPE,  # 93
    Option.CLIENT_NETWORK_INTERFACE_IDENTIFIER,  # 94
    Option.PXE_CLIENT_ID,  # 97
)


class _Codec(dhcp4msg):
    options = (*((c, f) for c, f in dhcp4msg.options if c not in _RAW), *((c, "array8") for c in _RAW))


class Malformed(ValueError):
    """A datagram that is not a DHCP request netboot will answer; the message says why, on one line."""


@dataclass(frozen=True)
class Request:
    type: MessageType
    xid: int
    flags: int
    mac: str  # aa:bb:cc:dd:ee:ff
    ciaddr: str
    giaddr: str
    requested_ip: str | None = None  # option 50
    server_id: str | None = None  # option 54
    vendor_class: str = ""  # option 60, e.g. PXEClient:Arch:00007:UNDI:003000
    user_class: bytes = b""  # option 77 ("iPXE" from iPXE)
    arches: tuple[int, ...] = ()  # option 93 (RFC 4578)
    uuid: bytes | None = None  # option 97, echoed to PXE clients
    ipxe_features: bool = False  # option 175: only iPXE sends it
    params: tuple[int, ...] = ()  # option 55
    relay_info: bytes | None = None  # option 82, echoed (RFC 3046 §2.2)
    hostname: str = ""  # option 12
    client_id: bytes = b""  # option 61: with the MAC, names the client a lease belongs to (RFC 2131 §4.2)

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & 0x8000)


def _walk(data: bytes) -> list[int]:
    """The option codes in order; raises Malformed unless every option lies wholly inside the datagram."""
    codes = []
    at = OPTIONS_AT
    while at < len(data):
        code = data[at]
        if code == Option.PAD:
            at += 1
            continue
        if code == Option.END:
            return codes
        if at + 1 >= len(data):
            raise Malformed(f"option {code} has no length byte")
        end = at + 2 + data[at + 1]
        if end > len(data):
            raise Malformed(f"option {code} of {data[at + 1]} bytes runs past the end of the datagram")
        codes.append(code)
        at = end
    return codes  # no END, but the last option ends exactly at the end of the datagram


def _ip(value: Any, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise Malformed(f"{what} is not an IPv4 address") from None


def parse(data: bytes) -> Request:
    """A client's DHCP request (op BOOTREQUEST, Ethernet, a message type); anything else raises Malformed."""
    if len(data) > MAX_DATAGRAM:
        raise Malformed(f"{len(data)} bytes is larger than one Ethernet frame")
    if len(data) < OPTIONS_AT + 1:
        raise Malformed(f"{len(data)} bytes is shorter than a DHCP message")
    if data[0] != BOOTREQUEST:
        raise Malformed(f"op {data[0]} is not BOOTREQUEST")
    if data[1] != HTYPE_ETHERNET or data[2] != 6:
        raise Malformed(f"hardware type {data[1]} with address length {data[2]} is not Ethernet")
    if data[FIXED:OPTIONS_AT] != COOKIE:
        raise Malformed("no DHCP magic cookie (a BOOTP request)")
    codes = _walk(data)
    params = _params(data, codes)
    msg = _Codec(buf=data)
    try:
        msg.decode()
    except (ValueError, IndexError) as e:  # what pyroute2 raises for fields it cannot unpack
        raise Malformed(f"undecodable: {e}") from None
    options = msg["options"]
    if len(options) < len(set(codes)):
        missing = sorted(set(codes) - {_code(name) for name in options})
        raise Malformed(f"option {missing[0] if missing else '?'} has a value of the wrong size or kind")
    kind = options.get("message_type")
    if not isinstance(kind, MessageType):
        raise Malformed("no DHCP message type (option 53)")
    arches = bytes(options.get("client_system_architecture_type", []))
    if len(arches) % 2:
        raise Malformed(f"option 93 has odd length {len(arches)}")
    return Request(
        type=kind,
        xid=msg["xid"],
        flags=msg["flags"],
        mac=msg["chaddr"],
        ciaddr=_ip(msg["ciaddr"], "ciaddr"),
        giaddr=_ip(msg["giaddr"], "giaddr"),
        requested_ip=_ip(options["requested_ip"], "option 50") if "requested_ip" in options else None,
        server_id=_ip(options["server_id"], "option 54") if "server_id" in options else None,
        vendor_class=_text(options.get("vendor_id", "")),
        user_class=bytes(options.get("user_class_information", [])),
        arches=tuple(int.from_bytes(arches[i : i + 2], "big") for i in range(0, len(arches), 2)),
        uuid=bytes(options["pxe_client_id"]) if "pxe_client_id" in options else None,
        ipxe_features="option175" in options,
        params=params,
        relay_info=bytes(options["relay_agent_information"]) if "relay_agent_information" in options else None,
        hostname=_text(options.get("host_name", "")),
        client_id=bytes(options.get("client_id", [])),
    )


def _params(data: bytes, codes: list[int]) -> tuple[int, ...]:
    """Option 55, refused when hostile: a code twice, or PAD/END in it (there are only 254 options to ask for)."""
    if Option.PARAMETER_LIST not in codes:
        return ()
    if codes.count(Option.PARAMETER_LIST) > 1:
        raise Malformed("option 55 appears more than once")
    at = OPTIONS_AT
    while data[at] != Option.PARAMETER_LIST:
        at += 1 if data[at] == Option.PAD else 2 + data[at + 1]
    wanted = data[at + 2 : at + 2 + data[at + 1]]
    if len(set(wanted)) != len(wanted) or Option.PAD in wanted or Option.END in wanted:
        raise Malformed(f"option 55 lists {len(wanted)} codes with repeats or PAD/END")
    return tuple(wanted)


def _code(name: str) -> int:
    if name.startswith("option") and name[6:].isdigit():
        return int(name[6:])
    return Option[name.upper()].value


def _text(value: Any) -> str:
    """pyroute2 gives text options as str, or as a list of byte values when they are not UTF-8."""
    if isinstance(value, str):
        return value
    return bytes(value).decode("latin-1")


@dataclass
class Reply:
    """A BOOTREPLY to one request; options in the order they are sent, by pyroute2's names."""

    request: Request
    type: MessageType
    yiaddr: str = ZERO
    siaddr: str = ZERO
    sname: str = ""
    file: str = ""
    options: dict[str, Any] | None = None

    def encode(self) -> bytes:
        options: dict[str, Any] = {"message_type": self.type}
        options.update(self.options or {})
        msg = _Codec({
            "op": BOOTREPLY, "htype": HTYPE_ETHERNET, "hlen": 6, "hops": 0, "xid": self.request.xid, "secs": 0,
            "flags": self.request.flags, "ciaddr": self.request.ciaddr if self.type != MessageType.NAK else ZERO,
            "yiaddr": self.yiaddr, "siaddr": self.siaddr, "giaddr": self.request.giaddr,
            "chaddr": self.request.mac, "sname": _field(self.sname, 64, "sname"),
            "file": _field(self.file, 128, "file"), "options": options,
        })
        data = msg.encode().buf
        return data + bytes(max(0, MIN_REPLY - len(data)))


def _field(text: str, size: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raise ValueError(f"{what} {text!r} does not fit in {size - 1} bytes")
    return raw
