"""Packet parsing and building, without I/O."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netboot.tftp import packets
from netboot.tftp.packets import Ack, Data, Error, OptionAck, PacketError, Request


def test_request_with_options_keeps_order_and_lowercases_names() -> None:
    raw = b"\x00\x01pxelinux.0\x00OCTET\x00TSize\x000\x00BLKSIZE\x001456\x00foo\x00bar\x00"
    request = packets.parse_request(raw)
    assert request == Request(packets.RRQ, "pxelinux.0", "octet",
                              (("tsize", "0"), ("blksize", "1456"), ("foo", "bar")))


def test_a_repeated_option_keeps_its_first_value() -> None:
    request = packets.parse_request(b"\x00\x01f\x00octet\x00blksize\x001024\x00BlkSize\x00512\x00")
    assert request.options == (("blksize", "1024"),)


@pytest.mark.parametrize("garbage", [b"\xff" * 9, b"blksize", b"blksize\x001468", b"blksize\x00"])
def test_pxe_rom_garbage_after_the_request_is_ignored(garbage: bytes) -> None:
    request = packets.parse_request(b"\x00\x01boot/pxelinux.0\x00octet\x00tsize\x000\x00" + garbage)
    assert request.filename == "boot/pxelinux.0"
    assert request.options == (("tsize", "0"),)


def test_mode_without_final_nul_is_accepted() -> None:
    assert packets.parse_request(b"\x00\x01name\x00netascii").mode == "netascii"


def test_filename_bytes_survive_exactly() -> None:
    request = packets.parse_request(b"\x00\x01caf\xe9\xff.bin\x00octet\x00")
    assert request.filename.encode("utf-8", "surrogateescape") == b"caf\xe9\xff.bin"


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x00\x01", b"\x00\x01name", b"\x00\x01name\x00mail\x00",
                                 b"\x00\x01name\x00\xff\xfe\x00", b"\x00\x03\x00", b"\x00\x09junk",
                                 b"\x00\x06a\x00"])
def test_malformed_packets_are_refused_with_a_reason(raw: bytes) -> None:
    with pytest.raises(PacketError) as info:
        packets.parse(raw)
    assert str(info.value)


def test_write_request_is_recognised() -> None:
    assert packets.parse_request(packets.build_request("x", opcode=packets.WRQ)).is_write


def test_build_and_parse_round_trip() -> None:
    assert packets.parse(packets.build_data(65536 + 7, b"abc")) == Data(7, b"abc")
    assert packets.parse(packets.build_ack(65535)) == Ack(65535)
    assert packets.parse(packets.build_error(1, "File not found")) == Error(1, "File not found")
    assert packets.parse(packets.build_oack((("blksize", "1468"), ("tsize", "9")))) == OptionAck(
        (("blksize", "1468"), ("tsize", "9")))
    assert packets.build_oack((("blksize", "1468"),)) == b"\x00\x06blksize\x001468\x00"
    assert packets.parse(packets.build_request("a/b", "octet", (("windowsize", "16"),))) == Request(
        packets.RRQ, "a/b", "octet", (("windowsize", "16"),))


def test_error_message_without_terminator_is_tolerated() -> None:
    assert packets.parse(b"\x00\x05\x00\x08User aborted") == Error(8, "User aborted")


@given(st.binary(max_size=600))
def test_parsing_anything_raises_nothing_but_packet_error(raw: bytes) -> None:
    with contextlib.suppress(PacketError):
        packets.parse(raw)


@given(st.lists(st.binary(max_size=20), max_size=12), st.binary(max_size=8))
def test_parsing_request_shaped_noise(strings: list[bytes], tail: bytes) -> None:
    raw = b"\x00\x01" + b"\x00".join(strings) + b"\x00" + tail
    try:
        request = packets.parse_request(raw)
    except PacketError:
        return
    assert request.mode in packets.MODES
    assert all(name == name.lower() for name, _ in request.options)


def test_requests_are_bounded() -> None:
    assert packets.parse_request(packets.build_request("a" * 512)).filename == "a" * 512
    with pytest.raises(packets.PacketError, match="file name of 513 bytes, longer than 512"):
        packets.parse_request(packets.build_request("a" * 513))
    many = tuple((f"o{i}", "v") for i in range(40))
    long = (("blksize", "1" * 65), ("x" * 65, "1"), ("tsize", "0"))
    assert packets.parse_request(packets.build_request("f", "octet", long)).options == (("tsize", "0"),)
    assert len(packets.parse_request(packets.build_request("f", "octet", many)).options) == packets.MAX_OPTIONS
    with pytest.raises(packets.PacketError) as e:
        packets.parse_request(b"\0\1f\0" + b"m" * 5000 + b"\0")
    assert len(str(e.value)) < 80
    assert len(packets.build_error(1, "x" * 5000)) == 4 + packets.MAX_ERROR_MESSAGE + 1
