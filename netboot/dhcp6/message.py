"""DHCPv6 messages (RFC 8415): a client's message parsed strictly, through any relays, and a reply built.

Client/server messages are msg-type (1 byte), transaction-id (3 bytes) and options (code 2, length 2, value);
a Relay-Forward adds hop-count, link-address and peer-address and carries the relayed message in its option 9
(§9). Parsing is bounded: a datagram of at most MAX_DATAGRAM bytes, at most MAX_OPTIONS options in any one
message, at most MAX_RELAYS relays around it, every option wholly inside its message, the options netboot reads
of their defined size and present once where RFC 8415 §21 allows one. Relays are unwrapped in a loop, never by
recursion, so no nesting of Relay-Forwards costs more than its bytes. Anything else raises `Malformed`, the
codec's one error, whose message says on one line what was wrong.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum

MAX_DATAGRAM = 8192  # a client's message is well under one Ethernet frame; relays add their headers around it
MAX_OPTIONS = 256  # in one message (or relay header, or IA): a real client sends about ten
MAX_RELAYS = 32  # Relay-Forwards around one message (RFC 8415 §7.6 HOP_COUNT_LIMIT is 8; deeper is refused)


class MessageType(IntEnum):
    SOLICIT = 1
    ADVERTISE = 2
    REQUEST = 3
    CONFIRM = 4
    RENEW = 5
    REBIND = 6
    REPLY = 7
    RELEASE = 8
    DECLINE = 9
    RECONFIGURE = 10
    INFORMATION_REQUEST = 11
    RELAY_FORW = 12
    RELAY_REPL = 13


# Option codes (RFC 8415 §21, RFC 5970 for 59 and 61, RFC 6939 for 79).
CLIENTID, SERVERID, IA_NA, IA_TA, IAADDR, ORO, PREFERENCE, ELAPSED_TIME = 1, 2, 3, 4, 5, 6, 7, 8
RELAY_MSG, STATUS_CODE, RAPID_COMMIT, USER_CLASS, VENDOR_CLASS, INTERFACE_ID = 9, 13, 14, 15, 16, 18
BOOTFILE_URL, BOOTFILE_PARAM, CLIENT_ARCH_TYPE, CLIENT_LINKLAYER_ADDR = 59, 60, 61, 79


class Status(IntEnum):
    SUCCESS = 0
    UNSPEC_FAIL = 1
    NO_ADDRS_AVAIL = 2
    NO_BINDING = 3
    NOT_ON_LINK = 4
    USE_MULTICAST = 5


CLIENT_TYPES = frozenset({MessageType.SOLICIT, MessageType.REQUEST, MessageType.CONFIRM, MessageType.RENEW,
                          MessageType.REBIND, MessageType.RELEASE, MessageType.DECLINE,
                          MessageType.INFORMATION_REQUEST})
# Options a message carries at most once (RFC 8415 §21: "MUST NOT appear more than once"), among those read here.
_SINGLE = frozenset({CLIENTID, SERVERID, ORO, PREFERENCE, ELAPSED_TIME, RELAY_MSG, RAPID_COMMIT, USER_CLASS,
                     INTERFACE_ID, CLIENT_ARCH_TYPE, CLIENT_LINKLAYER_ADDR, STATUS_CODE})
_OPTION = struct.Struct("!HH")
_IA = struct.Struct("!III")
_IAADDR = struct.Struct("!16sII")
_RELAY = struct.Struct("!BB16s16s")
MAX_DUID = 130  # RFC 8415 §11.1: a DUID is at most 128 bytes after its 2-byte type


def text(packed: bytes) -> str:
    """An address as text (RFC 5952's form, as ipaddress writes it), from its 16 bytes."""
    return socket.inet_ntop(socket.AF_INET6, packed)


def packed(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, address)


class Malformed(ValueError):
    """A datagram that is not a DHCPv6 message netboot will answer; the message says why, on one line."""


@dataclass(frozen=True, slots=True)
class IA:
    """An IA_NA: its IAID and the addresses the client names in it (RFC 8415 §21.4)."""

    iaid: int
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Relay:
    """One Relay-Forward around the message (outermost first in Request.relays)."""

    hop_count: int
    link_address: str
    peer_address: str
    interface_id: bytes | None = None  # option 18, echoed in the Relay-Reply (RFC 8415 §19.3)
    link_layer: bytes = b""  # option 79 (RFC 6939): the client's hardware type (2 bytes) and address


@dataclass(slots=True)
class Request:
    type: MessageType
    xid: bytes  # 3 bytes
    client_id: bytes | None = None  # option 1: the client's DUID
    server_id: bytes | None = None  # option 2
    ias: tuple[IA, ...] = ()  # options 3
    oro: tuple[int, ...] = ()  # option 6
    rapid_commit: bool = False  # option 14
    user_class: tuple[bytes, ...] = ()  # option 15
    vendor_classes: tuple[tuple[int, tuple[bytes, ...]], ...] = ()  # options 16: (enterprise, data)
    arches: tuple[int, ...] = ()  # option 61 (RFC 5970)
    relays: tuple[Relay, ...] = ()  # outermost first
    other_ias: bool = False  # IA_TA or IA_PD, which this server does not hand out
    ipxe_features: bool = False  # DHCPv4's option 175 has no DHCPv6 twin: iPXE says so by its user class only

    @property
    def vendor_class(self) -> str:
        """The first vendor class datum of enterprise 343 (Intel: PXE), e.g. PXEClient:Arch:00007:UNDI:003016."""
        for enterprise, data in self.vendor_classes:
            if enterprise == 343 and data:
                return data[0].decode("latin-1")
        return ""


def _options(data: bytes | memoryview, what: str) -> list[tuple[int, bytes]]:
    """The options of one message (or IA, or IA address) as (code, value); strict and bounded."""
    view = memoryview(data)
    found: list[tuple[int, bytes]] = []
    at, size = 0, len(view)
    while at < size:
        if at + 4 > size:
            raise Malformed(f"{what}: an option header cut short at byte {at}")
        code, length = _OPTION.unpack_from(view, at)
        end = at + 4 + length
        if end > size:
            raise Malformed(f"{what}: option {code} of {length} bytes runs past the end")
        if len(found) >= MAX_OPTIONS:
            raise Malformed(f"{what}: more than {MAX_OPTIONS} options")
        found.append((code, bytes(view[at + 4 : end])))
        at = end
    return found


def _single(options: list[tuple[int, bytes]], what: str) -> dict[int, bytes]:
    """The options by code; a code of _SINGLE that appears twice is refused."""
    by_code: dict[int, bytes] = {}
    for code, value in options:
        if code in by_code and code in _SINGLE:
            raise Malformed(f"{what}: option {code} appears more than once")
        by_code.setdefault(code, value)
    return by_code


def _list16(value: bytes, what: str) -> tuple[bytes, ...]:
    """user-class-data or vendor-class-data: items of a 2-byte length and that many bytes, filling the option."""
    items = []
    at = 0
    while at < len(value):
        if at + 2 > len(value):
            raise Malformed(f"{what}: an item length cut short")
        (length,) = struct.unpack_from("!H", value, at)
        if at + 2 + length > len(value):
            raise Malformed(f"{what}: an item of {length} bytes runs past the end")
        items.append(value[at + 2 : at + 2 + length])
        at += 2 + length
    return tuple(items)


def _ia(value: bytes) -> IA:
    if len(value) < _IA.size:
        raise Malformed(f"option 3 (IA_NA) of {len(value)} bytes is shorter than its 12-byte header")
    iaid, _t1, _t2 = _IA.unpack_from(value)
    addresses = []
    for code, inner in _options(value[_IA.size :], "IA_NA"):
        if code == IAADDR:
            if len(inner) < _IAADDR.size:
                raise Malformed(f"IA_NA: option 5 (IAADDR) of {len(inner)} bytes is shorter than 24")
            _options(inner[_IAADDR.size :], "IAADDR")  # checked, not kept
            addresses.append(text(inner[:16]))
    return IA(iaid, tuple(addresses))


def _duid(value: bytes, code: int) -> bytes:
    if not 2 < len(value) <= MAX_DUID:
        raise Malformed(f"option {code} holds a DUID of {len(value)} bytes (3 to {MAX_DUID})")
    return value


def parse(data: bytes) -> Request:
    """A client's message, unwrapped from any Relay-Forwards; anything else raises Malformed."""
    if len(data) > MAX_DATAGRAM:
        raise Malformed(f"{len(data)} bytes is larger than any DHCPv6 message netboot answers ({MAX_DATAGRAM})")
    relays: list[Relay] = []
    while True:
        if len(data) < 4:
            raise Malformed(f"{len(data)} bytes is shorter than a DHCPv6 message")
        kind = data[0]
        if kind != MessageType.RELAY_FORW:
            break
        if len(relays) >= MAX_RELAYS:
            raise Malformed(f"more than {MAX_RELAYS} Relay-Forwards around one message")
        if len(data) < _RELAY.size:
            raise Malformed(f"a Relay-Forward of {len(data)} bytes is shorter than its 34-byte header")
        hops, link, peer = _RELAY.unpack_from(data)[1:]
        options = _single(_options(memoryview(data)[_RELAY.size :], "Relay-Forward"), "Relay-Forward")
        inner = options.get(RELAY_MSG)
        if inner is None:
            raise Malformed("a Relay-Forward without a relayed message (option 9)")
        link_layer = options.get(CLIENT_LINKLAYER_ADDR, b"")
        if link_layer and len(link_layer) < 3:
            raise Malformed(f"option 79 of {len(link_layer)} bytes holds no link-layer address")
        relays.append(Relay(hops, text(link), text(peer), options.get(INTERFACE_ID),
                            link_layer))
        data = inner
    if kind not in CLIENT_TYPES:
        raise Malformed(f"message type {kind} is not one a client sends")
    found = _options(memoryview(data)[4:], MessageType(kind).name)
    options = _single(found, MessageType(kind).name)
    request = Request(MessageType(kind), bytes(data[1:4]), relays=tuple(relays))
    if CLIENTID in options:
        request.client_id = _duid(options[CLIENTID], CLIENTID)
    if SERVERID in options:
        request.server_id = _duid(options[SERVERID], SERVERID)
    oro = options.get(ORO, b"")
    if len(oro) % 2:
        raise Malformed(f"option 6 (ORO) has odd length {len(oro)}")
    request.oro = struct.unpack(f"!{len(oro) // 2}H", oro)
    elapsed = options.get(ELAPSED_TIME)
    if elapsed is not None and len(elapsed) != 2:
        raise Malformed(f"option 8 (elapsed time) of {len(elapsed)} bytes, not 2")
    if RAPID_COMMIT in options:
        if options[RAPID_COMMIT]:
            raise Malformed("option 14 (rapid commit) is not empty")
        request.rapid_commit = True
    if USER_CLASS in options:
        request.user_class = _list16(options[USER_CLASS], "option 15 (user class)")
    arches = options.get(CLIENT_ARCH_TYPE, b"")
    if len(arches) % 2:
        raise Malformed(f"option 61 (client architecture) has odd length {len(arches)}")
    request.arches = struct.unpack(f"!{len(arches) // 2}H", arches)
    ias, classes = [], []
    seen_iaids: set[int] = set()
    for code, value in found:
        if code == IA_NA:
            ia = _ia(value)
            if ia.iaid in seen_iaids:
                raise Malformed(f"two IA_NA options with IAID {ia.iaid}")
            seen_iaids.add(ia.iaid)
            ias.append(ia)
        elif code == VENDOR_CLASS:
            if len(value) < 4:
                raise Malformed(f"option 16 (vendor class) of {len(value)} bytes has no enterprise number")
            classes.append((struct.unpack_from("!I", value)[0], _list16(value[4:], "option 16 (vendor class)")))
        elif code in (IA_TA, 25):  # IA_TA, IA_PD
            request.other_ias = True
    request.ias, request.vendor_classes = tuple(ias), tuple(classes)
    return request


def option(code: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"option {code} of {len(value)} bytes does not fit")
    return _OPTION.pack(code, len(value)) + value


def status(code: Status, text: str = "") -> bytes:
    return option(STATUS_CODE, struct.pack("!H", code) + text.encode())


def ia_na(iaid: int, t1: int, t2: int, addresses: tuple[tuple[str, int, int], ...] = (),
          status_code: bytes = b"") -> bytes:
    """An IA_NA with (address, preferred, valid lifetime) entries, or a status code (RFC 8415 §21.4, §21.6)."""
    inner = b"".join(option(IAADDR, _IAADDR.pack(packed(a), p, v)) for a, p, v in addresses)
    return option(IA_NA, _IA.pack(iaid, t1, t2) + inner + status_code)


def vendor_class(enterprise: int, *data: bytes) -> bytes:
    return option(VENDOR_CLASS, struct.pack("!I", enterprise) + b"".join(struct.pack("!H", len(d)) + d
                                                                          for d in data))


@dataclass
class Reply:
    """An answer (Advertise or Reply) to `request`, wrapped in a Relay-Reply for each relay it came through."""

    request: Request
    type: MessageType
    options: list[bytes] = field(default_factory=list)  # encoded, in the order sent

    def encode(self) -> bytes:
        data = bytes((self.type,)) + self.request.xid + b"".join(self.options)
        for relay in reversed(self.request.relays):  # innermost relay first
            echoed = option(INTERFACE_ID, relay.interface_id) if relay.interface_id is not None else b""
            data = (_RELAY.pack(MessageType.RELAY_REPL, relay.hop_count, packed(relay.link_address),
                                packed(relay.peer_address)) + echoed + option(RELAY_MSG, data))
        return data
