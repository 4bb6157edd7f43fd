"""Parsing requests and building replies, without I/O: real firmware's datagrams, and hostile ones."""

from __future__ import annotations

import contextlib
import struct

import pytest
from dhcp_support import ACK, DISCOVER, EDK2_VENDOR, OFFER, REQUEST, UUID, bios, edk2, ipxe, parse_reply, request
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.dhcp.enums.dhcp import MessageType

from netboot.dhcp import message
from netboot.dhcp.message import Malformed, Reply


def test_edk2_discover() -> None:
    r = message.parse(edk2(mac="52:54:00:AB:CD:EF"))
    assert r.type == MessageType.DISCOVER
    assert r.mac == "52:54:00:ab:cd:ef"
    assert r.xid == 0x1234ABCD and r.broadcast
    assert r.vendor_class == EDK2_VENDOR.decode()
    assert r.arches == (7,)
    assert r.uuid == UUID
    assert 66 in r.params and 67 in r.params
    assert not r.ipxe_features and r.user_class == b""
    assert r.ciaddr == r.giaddr == "0.0.0.0"


def test_ipxe_request_is_told_apart() -> None:
    r = message.parse(ipxe(REQUEST, extra=[(50, bytes([192, 0, 2, 101])), (54, bytes([192, 0, 2, 10]))]))
    assert r.user_class == b"iPXE" and r.ipxe_features
    assert r.requested_ip == "192.0.2.101" and r.server_id == "192.0.2.10"


def test_binary_options_survive_exactly() -> None:
    uuid = bytes(17)  # all zeroes: a text decoder would strip them to nothing
    r = message.parse(request(DISCOVER, options=[(97, uuid), (82, b"\x01\x03ab\x00"), (60, b"PXEClient\xff")]))
    assert r.uuid == uuid and r.relay_info == b"\x01\x03ab\x00"
    assert r.vendor_class == "PXEClient\xff"


def test_pad_options_and_missing_end_are_accepted() -> None:
    data = request(DISCOVER, options=[(0, b"")][:0], end=False)
    assert message.parse(data).type == MessageType.DISCOVER
    padded = data[:240] + b"\x00\x00" + data[240:] + b"\xff" + b"\x00" * 40
    assert message.parse(padded).type == MessageType.DISCOVER


HOSTILE = {
    "empty": b"",
    "truncated fixed part": edk2()[:100],
    "truncated before the cookie": edk2()[:238],
    "no cookie (BOOTP)": edk2()[:236] + b"\0\0\0\0" + edk2()[240:],
    "option overflowing the datagram": request(DISCOVER, options=[(60, b"PXEClient")], end=False)[:-3],
    "length byte missing": request(DISCOVER, end=False) + b"\x3c",
    "option length past the end": request(DISCOVER, end=False) + b"\x3c\xff" + b"x" * 20,
    "wrong size for an address": request(DISCOVER, options=[(50, b"\xc0\x00\x02")]),
    "wrong size for a message type": request(DISCOVER, options=[])[:240] + b"\x35\x02\x01\x01\xff",
    "unknown message type": request(DISCOVER)[:240] + b"\x35\x01\x63\xff",
    "no message type": request(DISCOVER)[:240] + b"\x3c\x03abc\xff",
    "odd option 93": request(DISCOVER, options=[(93, b"\x00\x07\x00")]),
    "huge option 55 with repeats": request(DISCOVER, options=[(55, bytes([1, 3]) * 127)]),
    "option 55 twice": request(DISCOVER, options=[(55, b"\x01"), (55, b"\x03")]),
    "option 55 holding END": request(DISCOVER, options=[(55, b"\x01\xff")]),
    "token ring": request(DISCOVER, htype=6),
    "hardware address of 16 bytes": request(DISCOVER, hlen=16),
    "a reply": b"\x02" + request(DISCOVER)[1:],
    "jumbo": request(DISCOVER, options=[(224, b"x" * 255)] * 6),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_datagrams_are_refused_with_a_one_line_reason(name: str) -> None:
    with pytest.raises(Malformed) as info:
        message.parse(HOSTILE[name])
    assert str(info.value) and "\n" not in str(info.value)


def test_a_full_option_55_of_distinct_codes_is_fine() -> None:
    assert len(message.parse(request(DISCOVER, options=[(55, bytes(range(1, 255)))])).params) == 254


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_anything_is_a_request_or_refused(data: bytes) -> None:
    with contextlib.suppress(Malformed):
        message.parse(data)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 254), st.binary(max_size=40)), max_size=12), st.integers(0, 60))
def test_fuzz_options_of_a_real_request(options: list[tuple[int, bytes]], cut: int) -> None:
    data = edk2(extra=options)
    for candidate in (data, data[: len(data) - cut]):
        try:
            r = message.parse(candidate)
        except Malformed:
            continue
        assert r.mac == "52:54:00:00:00:01"


def test_reply_carries_the_fields_and_options_in_order_and_is_at_least_300_bytes() -> None:
    r = message.parse(edk2())
    data = Reply(r, MessageType.OFFER, siaddr="192.0.2.10", file="ipxe.efi",
                 options={"server_id": "192.0.2.10", "vendor_id": "PXEClient", "pxe_client_id": UUID,
                          "vendor_specific_information": bytes([6, 1, 8, 255])}).encode()
    reply = parse_reply(data)
    assert reply.size >= 300
    assert (reply.op, reply.type, reply.xid, reply.flags) == (2, OFFER, 0x1234ABCD, 0x8000)
    assert (reply.yiaddr, reply.siaddr, reply.file, reply.mac) == ("0.0.0.0", "192.0.2.10", "ipxe.efi",
                                                                   "52:54:00:00:00:01")
    assert reply.address(54) == "192.0.2.10" and reply.text(60) == "PXEClient"
    assert reply.options[97] == UUID and reply.options[43] == bytes([6, 1, 8, 255])
    assert next(iter(reply.options)) == 53


def test_reply_lease_options() -> None:
    r = message.parse(bios(REQUEST, ciaddr="192.0.2.101", flags=0))
    data = Reply(r, MessageType.ACK, yiaddr="192.0.2.101", options={
        "server_id": "192.0.2.10", "lease_time": 3600, "subnet_mask": "255.255.255.0",
        "router": ["192.0.2.1"], "name_server": ["192.0.2.1", "192.0.2.2"], "host_name": "node1"}).encode()
    reply = parse_reply(data)
    assert reply.type == ACK and reply.ciaddr == "192.0.2.101" and reply.flags == 0
    assert reply.number(51) == 3600 and reply.address(1) == "255.255.255.0"
    assert reply.options[6] == bytes([192, 0, 2, 1, 192, 0, 2, 2]) and reply.text(12) == "node1"
    assert struct.unpack("!4B", reply.options[3]) == (192, 0, 2, 1)
