"""The DHCPv6 codec: firmware's messages read field by field, replies read back by an independent reader, and
anything else refused with the codec's one error, whatever hypothesis or a flood of nested relays throws at it."""

from __future__ import annotations

import contextlib
import struct
import time

import pytest
from dhcp6_support import (
    EDK2_VENDOR,
    INFORMATION_REQUEST,
    RELAY_FORW,
    REQUEST,
    SOLICIT,
    duid_llt,
    edk2,
    ia_na,
    ipxe,
    message,
    opt,
    read,
    relay_forward,
    unwrap,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot.dhcp6 import message as codec
from netboot.dhcp6.message import IA, MAX_DATAGRAM, MAX_OPTIONS, MAX_RELAYS, Malformed, MessageType, Reply, Status

MAC = "52:54:00:00:06:01"


def test_edk2_solicit_is_read_field_by_field() -> None:
    r = codec.parse(edk2(mac=MAC, iaid=7))
    assert r.type == MessageType.SOLICIT and r.xid == b"\x12\x34\x56"
    assert r.client_id == duid_llt(MAC) and r.server_id is None
    assert r.ias == (IA(7),)
    assert r.oro == (59, 60, 23) and r.arches == (7,)
    assert r.vendor_classes == ((343, (EDK2_VENDOR,)),) and r.vendor_class == EDK2_VENDOR.decode()
    assert r.user_class == () and not r.rapid_commit and r.relays == ()


def test_ipxe_request_with_addresses_and_rapid_commit() -> None:
    r = codec.parse(ipxe(REQUEST, MAC, addresses=("2001:db8::1000", "2001:db8::1001"), server=b"\0\3\0\1abcdef",
                         rapid=True))
    assert r.type == MessageType.REQUEST and r.server_id == b"\0\3\0\1abcdef"
    assert r.ias == (IA(1, ("2001:db8::1000", "2001:db8::1001")),)
    assert r.user_class == (b"iPXE",) and r.rapid_commit


def test_relays_are_unwrapped_and_the_reply_wrapped_back() -> None:
    inner = ipxe(SOLICIT, MAC)
    one = relay_forward(inner, "fe80::5054:ff:fe00:601", "2001:db8:1::1", 0, opt(18, b"port7"), opt(79, b"\0\1" +
                                                                                                   bytes(6)))
    two = relay_forward(one, "2001:db8:1::1", "2001:db8:2::1", 1)
    r = codec.parse(two)
    assert [(x.hop_count, x.link_address, x.peer_address, x.interface_id) for x in r.relays] == [
        (1, "2001:db8:2::1", "2001:db8:1::1", None), (0, "2001:db8:1::1", "fe80::5054:ff:fe00:601", b"port7")]
    assert r.relays[1].link_layer == b"\0\1" + bytes(6)
    reply = Reply(r, MessageType.REPLY, [codec.option(codec.SERVERID, b"\0\3\0\1abcdef")])
    relays, answer = unwrap(reply.encode())
    assert [(h, link, peer) for h, link, peer, _ in relays] == [
        (1, "2001:db8:2::1", "2001:db8:1::1"), (0, "2001:db8:1::1", "fe80::5054:ff:fe00:601")]
    assert 18 not in relays[0][3] and relays[1][3][18] == [b"port7"]  # RFC 8415 §19.3: Interface-ID echoed
    assert answer.type == 7 and answer.xid == b"\x12\x34\x56" and answer.one(2) == b"\0\3\0\1abcdef"


def test_reply_pieces_read_back() -> None:
    r = codec.parse(edk2(mac=MAC))
    data = Reply(r, MessageType.ADVERTISE, [
        codec.ia_na(1, 1800, 2880, (("2001:db8::1000", 3600, 3600),)),
        codec.ia_na(2, 0, 0, status_code=codec.status(Status.NO_ADDRS_AVAIL, "none")),
        codec.vendor_class(343, b"HTTPClient"), codec.option(59, b"http://[2001:db8::10]:8080/x")]).encode()
    answer = read(data)
    assert answer.addresses == [(1, "2001:db8::1000", 3600, 3600)]
    assert answer.ia_statuses == [Status.NO_ADDRS_AVAIL]
    assert answer.one(16) == struct.pack("!IH", 343, 10) + b"HTTPClient"
    assert answer.one(59) == b"http://[2001:db8::10]:8080/x"


HOSTILE = {
    "empty": b"",
    "three bytes": b"\x01\x00\x00",
    "an option header cut short": message(SOLICIT, opt(1, duid_llt(MAC)))[:-12] + b"\x00",
    "an option past the end": message(SOLICIT) + struct.pack("!HH", 1, 40) + bytes(10),
    "a huge option length": message(SOLICIT) + struct.pack("!HH", 3, 0xFFFF),
    "an advertise (server's)": message(2, opt(1, duid_llt(MAC))),
    "a relay-reply": bytes([13, 0]) + bytes(32),
    "a relay header cut short": bytes([RELAY_FORW, 0]) + bytes(20),
    "a relay with no message": relay_forward(b"")[:-4],
    "a relay holding junk": relay_forward(b"\xff\xff"),
    "two client ids": message(SOLICIT, opt(1, duid_llt(MAC)), opt(1, duid_llt(MAC))),
    "two ORO": message(SOLICIT, opt(6, b"\0\x3b"), opt(6, b"\0\x3b")),
    "odd ORO": message(SOLICIT, opt(6, b"\0\x3b\0")),
    "odd arch": message(SOLICIT, opt(61, b"\0\x07\0")),
    "elapsed of 3 bytes": message(SOLICIT, opt(8, b"\0\0\0")),
    "rapid commit with data": message(SOLICIT, opt(14, b"\1")),
    "a DUID of 2 bytes": message(SOLICIT, opt(1, b"\0\1")),
    "a DUID of 200 bytes": message(SOLICIT, opt(1, bytes(200))),
    "an IA_NA shorter than its header": message(SOLICIT, opt(3, bytes(8))),
    "an IAADDR shorter than 24": message(SOLICIT, opt(3, bytes(12) + opt(5, bytes(20)))),
    "two IA_NA of one IAID": message(SOLICIT, ia_na(1), ia_na(1)),
    "a user class item past its end": message(SOLICIT, opt(15, b"\0\x09iPXE")),
    "a vendor class without enterprise": message(SOLICIT, opt(16, b"\0\0")),
    "too many options": message(SOLICIT, *[opt(100, b"")] * (MAX_OPTIONS + 1)),
    "too deep": (lambda d: [d := relay_forward(d) for _ in range(MAX_RELAYS + 1)][-1])(edk2()),
    "too large": message(SOLICIT, opt(100, bytes(MAX_DATAGRAM))),
    "a link-layer option without address": relay_forward(edk2(), "fe80::1", "::", 0, opt(79, b"\0\1")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_messages_are_refused_with_one_line(name: str) -> None:
    with pytest.raises(Malformed) as e:
        codec.parse(HOSTILE[name])
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_relays_just_deep_enough_are_read() -> None:
    data = edk2()
    for _ in range(MAX_RELAYS):
        data = relay_forward(data)
    assert len(codec.parse(data).relays) == MAX_RELAYS


def test_nesting_costs_its_bytes_only() -> None:
    """Relay-Forwards nested as deep as MAX_DATAGRAM allows: refused, without recursion, in well under a
    millisecond a relay."""
    data = edk2()
    while len(data) + 38 <= MAX_DATAGRAM:
        data = relay_forward(data)
    start = time.perf_counter()
    for _ in range(100):
        with pytest.raises(Malformed, match="Relay-Forwards"):
            codec.parse(data)
    assert time.perf_counter() - start < 5  # (a loose bound: a recursion or a quadratic walk would be far over)


def test_every_cut_of_a_solicit_parses_or_is_refused() -> None:
    data = ipxe(REQUEST, MAC, addresses=("2001:db8::1000",), server=b"\0\3\0\1abcdef", rapid=True)
    outcomes = set()
    for cut in range(len(data) + 1):
        try:
            codec.parse(data[:cut])
            outcomes.add("parsed")
        except Malformed:
            outcomes.add("refused")
    assert outcomes == {"parsed", "refused"}


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_are_refused(data: bytes) -> None:
    with contextlib.suppress(Malformed):
        codec.parse(data)


_OPTIONS = st.one_of(
    st.tuples(st.sampled_from([1, 2, 3, 5, 6, 8, 9, 13, 14, 15, 16, 18, 25, 59, 61, 79, 4000]),
              st.binary(max_size=40)),
    st.tuples(st.just(3), st.builds(lambda iaid, n: struct.pack("!III", iaid, 0, 0) + opt(5, bytes(24)) * n,
                                    st.integers(0, 2**32 - 1), st.integers(0, 3))),
)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([SOLICIT, REQUEST, 4, 5, 6, 8, 9, INFORMATION_REQUEST, RELAY_FORW, 2, 13, 0, 255]),
       st.lists(_OPTIONS, max_size=12), st.integers(0, 40), st.integers(0, 5))
def test_structured_messages_parse_or_are_refused(kind: int, options: list[tuple[int, bytes]], cut: int,
                                                  depth: int) -> None:
    data = message(kind, *(opt(c, v) for c, v in options))
    for _ in range(depth):
        data = relay_forward(data)
    for candidate in (data, data[: max(0, len(data) - cut)]):
        try:
            r = codec.parse(candidate)
        except Malformed:
            continue
        assert r.type in codec.CLIENT_TYPES and len(r.relays) <= MAX_RELAYS
        # What parsed, answered, wraps back into as many relays.
        relays, _ = unwrap(Reply(r, MessageType.REPLY).encode())
        assert len(relays) == len(r.relays)
