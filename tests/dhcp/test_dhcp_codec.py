"""netboot's DHCP codec against pyroute2's: the same table of option sizes, and (through conftest.py) the same
request or the same refusal for anything hypothesis draws, the same bytes for any reply."""

from __future__ import annotations

import contextlib
import string

from dhcp_support import DISCOVER, REQUEST, edk2, request
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.dhcp.enums.dhcp import MessageType
from reference_codec import fixed_sizes

from netboot.dhcp import message
from netboot.dhcp.message import FIXED_SIZES, OPTIONS, Malformed, Reply


def test_fixed_sizes_are_pyroute2s() -> None:
    assert fixed_sizes() == FIXED_SIZES


def _option() -> st.SearchStrategy[tuple[int, bytes]]:
    fixed = st.sampled_from(sorted(FIXED_SIZES)).flatmap(
        lambda code: st.tuples(st.just(code), st.binary(min_size=FIXED_SIZES[code] - 1,
                                                        max_size=FIXED_SIZES[code] + 1)))
    text = st.tuples(st.sampled_from([12, 60, 15, 66, 67]),
                     st.one_of(st.binary(max_size=20), st.text(max_size=10).map(str.encode),
                               st.text(max_size=10).map(lambda t: t.encode() + b"\0\0")))
    raw = st.tuples(st.sampled_from([43, 55, 61, 77, 82, 93, 94, 97, 175, 224]), st.binary(max_size=20))
    kind = st.tuples(st.just(53), st.binary(min_size=0, max_size=2) | st.integers(0, 12).map(lambda t: bytes([t])))
    return st.one_of(fixed, text, raw, kind)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([DISCOVER, REQUEST, 4, 7, 8]), st.lists(_option(), max_size=10), st.integers(0, 30),
       st.binary(min_size=6, max_size=6), st.integers(0, 0xFFFF))
def test_requests_read_alike(kind: int, options: list[tuple[int, bytes]], cut: int, mac: bytes, flags: int) -> None:
    data = request(kind, mac.hex(":"), options=options, flags=flags)
    for candidate in (data, data[: len(data) - cut], edk2(extra=options)):
        with contextlib.suppress(Malformed):
            message.parse(candidate)  # conftest.py: pyroute2's codec must agree


_ADDRESS = st.ip_addresses(v=4).map(str)
_TEXT = st.text(alphabet=string.ascii_letters + string.digits + ".-:/_", max_size=60)
_VALUES = {
    0: _ADDRESS,  # one address
    1: st.lists(_ADDRESS, min_size=1, max_size=4),
    2: _TEXT,
    3: st.binary(max_size=60),
    4: st.integers(0, 2**31 - 1),
}


@st.composite
def _replies(draw: st.DrawFn) -> Reply:
    names = draw(st.lists(st.sampled_from(sorted(OPTIONS)), unique=True))
    options = {name: draw(_VALUES[OPTIONS[name][1]]) for name in names}
    req = message.parse(request(DISCOVER, draw(st.binary(min_size=6, max_size=6)).hex(":"),
                                xid=draw(st.integers(0, 2**32 - 1)), flags=draw(st.integers(0, 0xFFFF)),
                                ciaddr=draw(_ADDRESS), giaddr=draw(_ADDRESS)))
    return Reply(req, draw(st.sampled_from(list(MessageType))), yiaddr=draw(_ADDRESS), siaddr=draw(_ADDRESS),
                 sname=draw(_TEXT), file=draw(_TEXT), options=options)


@settings(max_examples=400, deadline=None)
@given(_replies())
def test_replies_are_built_alike(reply: Reply) -> None:
    reply.encode()  # conftest.py: pyroute2's codec must build the same bytes
