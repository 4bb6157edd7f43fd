"""The DHCP codec through pyroute2's `dhcp4msg`: what netboot's own codec (`netboot.dhcp.message`) is checked against.

netboot's codec is hand-written for speed; this one is the maintained library's, with the three additions netboot
needs (the options area walked once to check its structure, since pyroute2 stops at the first option it cannot
decode and keeps what it had; the options netboot reads as bytes decoded as byte arrays rather than text; iPXE's
option 175, which pyroute2 reads as "option175" but cannot write, named as netboot's codec names it). Every
message the tests send goes through both (tests/dhcp/conftest.py), and test_dhcp_codec.py has hypothesis draw many
more: both must parse a request the same or both refuse it, and build the same bytes for a reply.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from pyroute2.dhcp import CodeMapping
from pyroute2.dhcp.dhcp4msg import dhcp4msg
from pyroute2.dhcp.enums.dhcp import MessageType, Option

from netboot.dhcp.message import (
    BOOTREPLY,
    COOKIE,
    FIXED,
    HTYPE_ETHERNET,
    MAX_DATAGRAM,
    MIN_REPLY,
    OPTIONS_AT,
    ZERO,
    Malformed,
    Reply,
    Request,
)

# pyroute2 logs each option it fails to decode and carries on.
logging.getLogger("pyroute2.dhcp").setLevel(logging.CRITICAL)

BOOTREQUEST = 1

# Options netboot reads or echoes as raw bytes (pyroute2 would decode them as text).
RAW = (
    Option.VENDOR_SPECIFIC_INFORMATION,  # 43
    Option.CLIENT_ID,  # 61
    Option.USER_CLASS_INFORMATION,  # 77
    Option.RELAY_AGENT_INFORMATION,  # 82
    Option.CLIENT_SYSTEM_ARCHITECTURE_TYPE,  # 93
    Option.CLIENT_NETWORK_INTERFACE_IDENTIFIER,  # 94
    Option.PXE_CLIENT_ID,  # 97
)


IPXE_ENCAPSULATED = 175  # not in pyroute2's Option enum


class Codec(dhcp4msg):
    options = (*((c, f) for c, f in dhcp4msg.options if c not in RAW), *((c, "array8") for c in RAW))

    def _register_options(self) -> None:
        super()._register_options()
        # What pyroute2 does with an option it does not know when it reads one (a byte array), under the name
        # netboot's codec gives it (message.OPTIONS), so that it can write it too.
        self._decode_map[IPXE_ENCAPSULATED] = self._encode_map["ipxe_encapsulated"] = CodeMapping(
            "ipxe_encapsulated", IPXE_ENCAPSULATED, "array8")


def _walk(data: bytes) -> list[int]:
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
    return codes


def _ip(value: Any, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise Malformed(f"{what} is not an IPv4 address") from None


def parse(data: bytes) -> Request:
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
    msg = Codec(buf=data)
    try:
        msg.decode()
    except (ValueError, IndexError) as e:
        raise Malformed(f"undecodable: {e}") from None
    options = msg["options"]
    if len(options) < len(set(codes)):
        raise Malformed("an option has a value of the wrong size or kind")
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
        ipxe_features="ipxe_encapsulated" in options,
        params=params,
        relay_info=bytes(options["relay_agent_information"]) if "relay_agent_information" in options else None,
        hostname=_text(options.get("host_name", "")),
        client_id=bytes(options["client_id"]) if "client_id" in options else b"",
    )


def _params(data: bytes, codes: list[int]) -> tuple[int, ...]:
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


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return bytes(value).decode("latin-1")


def encode(reply: Reply) -> bytes:
    options: dict[str, Any] = {"message_type": reply.type}
    options.update(reply.options or {})
    request = reply.request
    msg = Codec({
        "op": BOOTREPLY, "htype": HTYPE_ETHERNET, "hlen": 6, "hops": 0, "xid": request.xid, "secs": 0,
        "flags": request.flags, "ciaddr": request.ciaddr if reply.type != MessageType.NAK else ZERO,
        "yiaddr": reply.yiaddr, "siaddr": reply.siaddr, "giaddr": request.giaddr,
        "chaddr": request.mac, "sname": reply.sname.encode(), "file": reply.file.encode(), "options": options,
    })
    data = msg.encode().buf
    return data + bytes(max(0, MIN_REPLY - len(data)))


def fixed_sizes() -> dict[int, int]:
    """The options pyroute2 decodes with a fixed size, by code: what netboot's codec must refuse in other sizes."""
    sizes = {"ip4addr": 4, "be16": 2, "be32": 4, "sbe32": 4, "uint8": 1, "bool": 1, "message_type": 1}
    return {int(code): sizes[kind] for code, kind in Codec.options if kind in sizes}
